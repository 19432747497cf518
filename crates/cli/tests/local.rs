//! Local block devices end to end (issue 5): `blksnapd --fuse-dir` with loop
//! devices, real filesystems (ext4, xfs) on tracked devices and on snapshot
//! images, every kind of difference storage, storage overflow, change
//! tracking with `markdirtyblock --file`, concurrent I/O (direct writes
//! queued on a loop device all at once; writers on the origin and the image)
//! and a destroy under load, and the clean stop.
//!
//! Needs root, /dev/fuse, /dev/loop-control and the tools in [`TOOLS`].
//! Without them each test prints a loud `SKIPPED: <test>: <reason>` line and
//! passes, unless the environment variable CI is set: then it fails.
//!
//! Safety: a mounted loop device over our FUSE files must never lose its
//! daemon, or the machine may hang on it. So every test owns an [`Env`]
//! whose Drop (also on panic) stops background processes, unmounts every
//! mount point the test made (`umount`, then `umount -l`), detaches its own
//! loop devices and stops the daemon with `blksnap shutdown --force`; only a
//! wedged daemon is killed, after its FUSE connection was aborted. A
//! watchdog thread does the lazy unmount and abort if a test runs far too
//! long, so blocked I/O fails instead of hanging. Every external command
//! runs under `timeout`.

mod common;
#[path = "common/local_tools.rs"]
mod local_tools;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use blksnap_test_support::{changed_since, is_root, sparse_file, Pattern};
use common::{wait_until, Daemon};
use local_tools::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;
/// Longest any external command may run (seconds, for `timeout`).
const COMMAND_TIMEOUT: &str = "60";
/// A test still running after this is wedged: the watchdog unblocks it.
const WATCHDOG: Duration = Duration::from_secs(120);
/// Difference storage files grow in 8 MiB steps (which no chunk may
/// exceed).
const SMALL_STEPS: &str = "diff_storage_minimum = \"8M\"\nchunk_maximum_shift = 20\n";
/// Tools every test needs (found in PATH or an sbin directory).
const TOOLS: &[&str] = &[
    "timeout",
    "losetup",
    "mount",
    "umount",
    "mkfs.ext4",
    "mkfs.xfs",
    "md5sum",
    "sync",
    "dd",
    "kill",
];

// ---------------------------------------------------------------------------
// External commands, all under `timeout`.

/// Whether the test can run here; prints a loud SKIPPED line when it cannot
/// (and fails when CI is set: there the tests must run).
fn ready(test: &str, extra_tools: &[&str]) -> bool {
    let missing_tool = TOOLS.iter().chain(extra_tools).find(|t| which(t).is_none());
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
            "{test}: {reason}; CI is set, so the local-device tests must run \
             (as root, with /dev/fuse, losetup, mkfs.ext4 and mkfs.xfs)"
        );
    }
    loud(&format!(
        "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
         SKIPPED: {test}: {reason}\n\
         !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
    ));
    false
}

/// Stops a background command started under `timeout`: SIGTERM (timeout
/// passes it on), then SIGKILL to its process group. Never blocks for long.
fn stop_child(mut child: Child) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    let pid = child.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    if wait_until(Duration::from_secs(10), || {
        matches!(child.try_wait(), Ok(Some(_)))
    }) {
        return;
    }
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{pid}")])
        .status();
    if !wait_until(Duration::from_secs(10), || {
        matches!(child.try_wait(), Ok(Some(_)))
    }) {
        loud(&format!("background process {pid} does not exit"));
    }
}

// ---------------------------------------------------------------------------
// Files with md5 sums.

/// File name -> md5 (hex).
type Sums = BTreeMap<String, String>;

fn md5s(dir: &Path, names: &[String]) -> Sums {
    if names.is_empty() {
        return Sums::new();
    }
    let mut c = command("md5sum");
    c.current_dir(dir).arg("--").args(names);
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "md5sum in {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let (sum, name) = l.split_once("  ").expect("md5sum line");
            (name.to_string(), sum.to_string())
        })
        .collect()
}

/// `count` files of random content in `dir`, named `<prefix>-<i>`, each as
/// large as `size` says (drawing from the generator before the content);
/// returns their md5 sums. A failed write fails the test.
fn write_random_files(
    dir: &Path,
    prefix: &str,
    count: usize,
    seed: u64,
    mut size: impl FnMut(&mut fastrand::Rng) -> usize,
) -> Sums {
    std::fs::create_dir_all(dir).unwrap();
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut names = Vec::new();
    for i in 0..count {
        let mut data = vec![0u8; size(&mut rng)];
        rng.fill(&mut data);
        let name = format!("{prefix}-{i}");
        std::fs::write(dir.join(&name), &data)
            .unwrap_or_else(|e| panic!("writing {}/{name}: {e}", dir.display()));
        names.push(name);
    }
    md5s(dir, &names)
}

/// `count` files of random content and size (1 byte to `max`) in `dir`,
/// named `<prefix>-<i>`; returns their md5 sums.
fn write_files(dir: &Path, prefix: &str, count: usize, max: u64, seed: u64) -> Sums {
    write_random_files(dir, prefix, count, seed, |rng| rng.usize(1..=max as usize))
}

/// `count` files of exactly 1 MiB of random content; returns their sums.
fn write_mib_files(dir: &Path, prefix: &str, count: usize, seed: u64) -> Sums {
    write_random_files(dir, prefix, count, seed, |_| MIB as usize)
}

/// `dir` holds exactly the expected files, with the expected content.
fn verify(dir: &Path, expected: &Sums, what: &str) {
    let names: BTreeSet<String> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeSet::new(),
        Err(e) => panic!("{what}: cannot list {}: {e}", dir.display()),
    };
    let wanted: BTreeSet<String> = expected.keys().cloned().collect();
    assert_eq!(names, wanted, "{what}: files in {}", dir.display());
    let names: Vec<String> = names.into_iter().collect();
    let sums = md5s(dir, &names);
    for (name, sum) in expected {
        assert_eq!(
            sums.get(name),
            Some(sum),
            "{what}: content of {}/{name}",
            dir.display()
        );
    }
}

fn merged(a: &Sums, b: &Sums) -> Sums {
    a.iter()
        .chain(b)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// syncfs of the filesystem at `mount_point`.
fn sync_fs(mount_point: &Path) {
    run_ok("sync", &["-f", s(mount_point)]);
}

fn parse_json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("bad JSON {text:?}: {e}"))
}

// ---------------------------------------------------------------------------
// The test environment: a daemon with a FUSE frontend, and everything the
// test mounted or attached, cleaned up in Drop.

enum Fs {
    Ext4,
    Xfs,
}

struct Env {
    test: &'static str,
    work: PathBuf,
    fuse_dir: PathBuf,
    control: PathBuf,
    log: PathBuf,
    pid: u32,
    held: Arc<Mutex<Held>>,
    children: Mutex<Vec<Child>>,
    done: Arc<AtomicBool>,
    started: Instant,
    daemon: Option<Daemon>,
    _tmp: tempfile::TempDir,
}

impl Env {
    /// A daemon with `--fuse-dir <work>/dev` (and `--config` when given).
    fn start(test: &'static str, config: Option<&str>) -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("blksnap-local-")
            .tempdir()
            .unwrap();
        let work = tmp.path().canonicalize().unwrap();
        let fuse_dir = work.join("dev");
        let mut args = vec!["--fuse-dir".to_string(), s(&fuse_dir).to_string()];
        if let Some(text) = config {
            let path = work.join("blksnapd.toml");
            std::fs::write(&path, text).unwrap();
            args.extend(["--config".to_string(), s(&path).to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let daemon = Daemon::start_with(&args);
        let held = Arc::new(Mutex::new(Held::default()));
        let done = Arc::new(AtomicBool::new(false));
        {
            let (held, done, fuse_dir) = (held.clone(), done.clone(), fuse_dir.clone());
            std::thread::spawn(move || watchdog(test, held, done, fuse_dir));
        }
        Self {
            test,
            control: daemon.control.clone(),
            log: daemon.path("daemon.log"),
            pid: daemon.pid(),
            work,
            fuse_dir,
            held,
            children: Mutex::new(Vec::new()),
            done,
            started: Instant::now(),
            daemon: Some(daemon),
            _tmp: tmp,
        }
    }

    /// The test's environment; `None` when the test cannot run here (after
    /// [`ready`] said so).
    fn start_if_ready(
        test: &'static str,
        extra_tools: &[&str],
        config: Option<&str>,
    ) -> Option<Self> {
        ready(test, extra_tools).then(|| Self::start(test, config))
    }

    /// The usual origin: a 64 MiB file attached with a loop device, ext4 on
    /// it, mounted on `<work>/origin`. Returns (device name, loop device,
    /// mount point).
    fn ext4_origin(&self) -> (String, String, PathBuf) {
        let (dev, dev_loop) = self.attach_loop(&self.file("origin.img", 64 * MIB));
        self.mkfs(Fs::Ext4, &dev_loop);
        let origin = self.mount(&dev_loop, "origin", &[]);
        (dev, dev_loop, origin)
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

    fn cli_command(&self, args: &[&str]) -> Command {
        let mut c = command(env!("CARGO_BIN_EXE_blksnap"));
        c.args(args)
            .env("BLKSNAP_CONTROL", &self.control)
            .current_dir("/");
        c
    }

    fn cli(&self, args: &[&str]) -> Output {
        self.cli_command(args).output().unwrap()
    }

    /// Runs `blksnap`, asserts success, returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "blksnap {args:?} failed ({}): {}\ndaemon log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs `blksnap`, asserts status 1 and a message with every needle.
    fn fails(&self, args: &[&str], needles: &[&str]) -> String {
        let out = self.cli(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(1), "blksnap {args:?}: {stderr}");
        for n in needles {
            assert!(
                stderr.contains(n),
                "blksnap {args:?}: {stderr:?} lacks {n:?}"
            );
        }
        stderr
    }

    /// Starts `blksnap` in the background (stopped in Drop if still running);
    /// its stdout and stderr go to `<work>/<name>.out` and `.err`.
    fn spawn_cli(&self, args: &[&str], name: &str) -> u32 {
        let child = self
            .cli_command(args)
            .stdout(std::fs::File::create(self.work.join(format!("{name}.out"))).unwrap())
            .stderr(std::fs::File::create(self.work.join(format!("{name}.err"))).unwrap())
            .spawn()
            .unwrap();
        let pid = child.id();
        self.children.lock().unwrap().push(child);
        pid
    }

    /// Waits for a background command; panics if it runs past `limit`.
    fn wait_child(&self, pid: u32, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            {
                let mut children = self.children.lock().unwrap();
                let i = children.iter().position(|c| c.id() == pid).unwrap();
                if let Some(status) = children[i].try_wait().unwrap() {
                    // Reaped by try_wait: forget it.
                    children.retain(|c| c.id() != pid);
                    return status;
                }
            }
            assert!(
                Instant::now() < deadline,
                "background process {pid} still runs after {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The `snapshot_waitevent` requests of snapshot `id` so far.
    fn waits(&self, id: &str) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("SnapshotWaitevent") && l.contains(id))
            .count()
    }

    /// Waits (bounded) until the daemon has had more than `before`
    /// `snapshot_waitevent` requests of snapshot `id` (`before` from
    /// [`Self::waits`]): a watcher started since is watching.
    fn wait_watching(&self, id: &str, before: usize) {
        assert!(
            wait_until(Duration::from_secs(20), || self.waits(id) > before),
            "the watcher of {id} never waited:\n{}",
            self.log_tail()
        );
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
        assert!(out.contains("nbd="), "{out}");
        (name, device)
    }

    fn mkfs(&self, fs: Fs, device: &str) {
        match fs {
            // No lazy initialization: no background writes after mount.
            Fs::Ext4 => run_ok(
                "mkfs.ext4",
                &[
                    "-q",
                    "-F",
                    "-E",
                    "lazy_itable_init=0,lazy_journal_init=0",
                    device,
                ],
            ),
            // xfsprogs refuses filesystems under 300 MB unless it believes
            // it runs under fstests; these variables say so.
            Fs::Xfs => {
                let out = command("mkfs.xfs")
                    .args(["-q", "-f", device])
                    .env("TEST_DIR", "1")
                    .env("TEST_DEV", "1")
                    .env("QA_CHECK_FS", "1")
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "mkfs.xfs {device}: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                String::new()
            }
        };
    }

    /// Mounts `device` on `<work>/<name>`, which the Drop guard unmounts.
    fn try_mount(&self, device: &str, name: &str, options: &[&str]) -> (PathBuf, Output) {
        let mount_point = self.dir(name);
        self.held().mounts.push(mount_point.clone());
        let mut args: Vec<&str> = options.to_vec();
        args.extend([device, s(&mount_point)]);
        let out = run("mount", &args);
        (mount_point, out)
    }

    fn mount(&self, device: &str, name: &str, options: &[&str]) -> PathBuf {
        let (mount_point, out) = self.try_mount(device, name, options);
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

    /// Unmount and mount again: later reads come from the device, not from
    /// the page cache.
    fn remount(&self, device: &str, mount_point: &Path, options: &[&str]) {
        self.umount(mount_point);
        let name = mount_point.file_name().unwrap().to_str().unwrap();
        self.mount(device, name, options);
    }

    /// `losetup -f --show FILE`, detached by the Drop guard if still there.
    fn losetup(&self, file: &Path) -> String {
        let device = run_ok("losetup", &["-f", "--show", s(file)])
            .trim()
            .to_string();
        self.held().loops.push(device.clone());
        device
    }

    fn losetup_detach(&self, device: &str) {
        run_ok("losetup", &["-d", device]);
        self.held().loops.retain(|l| l != device);
    }

    fn create(&self, args: &[&str]) -> String {
        let mut all = vec!["snapshot_create"];
        all.extend(args);
        let id = self.ok(&all).trim().to_string();
        assert_eq!(id.len(), 36, "snapshot id {id:?}");
        id
    }

    /// Creates and takes a snapshot of `device` with its difference
    /// storage in `storage` (up to 1 GiB); returns its id.
    fn snapshot(&self, device: &str, storage: &Path) -> String {
        let id = self.create(&["--device", device, "--file", s(storage), "--limit", "1G"]);
        self.take(&id);
        id
    }

    /// `snapshot_appendstorage` of sector ranges (`start:count`) of `file`.
    fn append_storage(&self, id: &str, file: &Path, ranges: &[&str]) {
        let mut args = vec!["snapshot_appendstorage", "--id", id, "--device", s(file)];
        for range in ranges {
            args.extend(["--range", range]);
        }
        self.ok(&args);
    }

    /// `snapshot_take --json`: the result.
    fn take(&self, id: &str) -> Value {
        parse_json(&self.ok(&["snapshot_take", "--id", id, "--json"]))
    }

    fn image_of(&self, device: &str) -> String {
        let image = self
            .ok(&["snapshot_info", "--device", device, "--field", "image"])
            .trim()
            .to_string();
        assert!(image.starts_with("/dev/loop"), "image of {device}: {image}");
        let name = self.info(device)["for_device"]
            .as_str()
            .unwrap()
            .to_string();
        self.held()
            .daemon_loops
            .push((image.clone(), format!("snapshot/{name}")));
        image
    }

    fn info(&self, device: &str) -> Value {
        parse_json(&self.ok(&["snapshot_info", "--device", device, "--json"]))
    }

    fn storage_total(&self, device: &str) -> u64 {
        self.info(device)["storage"]["total"].as_u64().unwrap()
    }

    /// After a destroy: waits (5 s at most) until no loop device is left
    /// over an image's FUSE file; returns the directory of those files.
    fn wait_image_loops_gone(&self) -> PathBuf {
        let snapshot_files = self.fuse_dir.join("snapshot");
        assert!(
            wait_until(Duration::from_secs(5), || loops_under(&snapshot_files)
                .is_empty()),
            "image loop devices left after destroy: {:?}",
            loops_under(&snapshot_files)
        );
        snapshot_files
    }

    /// `list --json`.
    fn list(&self) -> Value {
        parse_json(&self.ok(&["list", "--json"]))
    }

    /// SIGKILL; returns the daemon's directory for [`Self::restart`].
    fn kill(&mut self) -> tempfile::TempDir {
        let mut old = self.daemon.take().unwrap();
        old.kill()
    }

    /// A new daemon over what a killed one left behind in `dir` (its state
    /// dir; its dead FUSE mount on the same directory).
    fn restart(&mut self, dir: tempfile::TempDir) {
        let daemon = Daemon::start_in(dir, &["--fuse-dir", s(&self.fuse_dir)]);
        self.pid = daemon.pid();
        self.control = daemon.control.clone();
        self.log = daemon.path("daemon.log");
        self.daemon = Some(daemon);
    }

    /// Stops the daemon with SIGTERM (it must exit within 20 s).
    fn sigterm_stop(&mut self) -> ExitStatus {
        common::signal(self.pid, "TERM");
        assert!(
            wait_until(Duration::from_secs(20), || !running(self.pid)),
            "blksnapd did not stop on SIGTERM:\n{}",
            self.log_tail()
        );
        // The daemon object stays: it owns the log.
        self.daemon.as_mut().unwrap().stop_or_status()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let children: Vec<Child> = self
            .children
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
            .collect();
        for child in children {
            stop_child(child);
        }
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
// 1. Filesystems on two origins and on their images.

#[test]
fn filesystems_on_origins_and_images() {
    const TEST: &str = "filesystems_on_origins_and_images";
    let Some(env) = Env::start_if_ready(TEST, &[], None) else {
        return;
    };
    let (a, a_loop) = env.attach_loop(&env.file("a.img", 64 * MIB));
    let (b, b_loop) = env.attach_loop(&env.file("b.img", 128 * MIB));
    env.mkfs(Fs::Ext4, &a_loop);
    env.mkfs(Fs::Xfs, &b_loop);
    let origin_a = env.mount(&a_loop, "origin-a", &[]);
    let origin_b = env.mount(&b_loop, "origin-b", &[]);
    let early_a = write_files(&origin_a.join("data"), "early", 20, MIB, 11);
    let early_b = write_files(&origin_b.join("data"), "early", 20, MIB, 12);
    sync_fs(&origin_a);
    sync_fs(&origin_b);

    let storage = env.dir("storage");
    let id = env.create(&[
        "--device",
        &a,
        "--device",
        &b,
        "--file",
        s(&storage),
        "--limit",
        "1G",
    ]);
    let taken = env.take(&id);
    let frozen: BTreeSet<&str> = taken["frozen"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        frozen,
        BTreeSet::from([s(&origin_a), s(&origin_b)]),
        "both filesystems frozen for the take: {taken}"
    );
    assert_eq!(taken["warnings"], serde_json::json!([]), "{taken}");

    let late_a = write_files(&origin_a.join("data"), "late", 20, MIB, 13);
    let late_b = write_files(&origin_b.join("data"), "late", 20, MIB, 14);
    sync_fs(&origin_a);
    sync_fs(&origin_b);

    let image_a = env.image_of(&a);
    let image_b = env.image_of(&b);
    let listing = |dir: &Path| -> BTreeSet<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect()
    };
    let names = BTreeSet::from([a.clone(), b.clone()]);
    let mut with_dir = names.clone();
    with_dir.insert("snapshot".into());
    assert_eq!(
        listing(&env.fuse_dir),
        with_dir,
        "FUSE files of the devices"
    );
    assert_eq!(
        listing(&env.fuse_dir.join("snapshot")),
        names,
        "FUSE files of the images"
    );
    assert_eq!(
        std::fs::metadata(env.fuse_dir.join("snapshot").join(&b))
            .unwrap()
            .len(),
        128 * MIB
    );
    let images = BTreeSet::from([&a_loop, &b_loop, &image_a, &image_b]);
    assert_eq!(images.len(), 4, "four distinct loop devices");
    let mounted_a = env.mount(&image_a, "image-a", &[]);
    // The image's xfs has the origin's UUID, mounted too.
    let mounted_b = env.mount(&image_b, "image-b", &["-o", "nouuid"]);
    verify(&mounted_a.join("data"), &early_a, "ext4 image");
    verify(&mounted_b.join("data"), &early_b, "xfs image");
    let own_a = write_files(&mounted_a.join("own"), "image", 10, MIB, 15);
    let own_b = write_files(&mounted_b.join("own"), "image", 10, MIB, 16);
    sync_fs(&mounted_a);
    sync_fs(&mounted_b);
    env.remount(&image_a, &mounted_a, &[]);
    env.remount(&image_b, &mounted_b, &["-o", "nouuid"]);
    for (mounted, early, own, what) in [
        (&mounted_a, &early_a, &own_a, "ext4 image after remount"),
        (&mounted_b, &early_b, &own_b, "xfs image after remount"),
    ] {
        verify(&mounted.join("data"), early, what);
        verify(&mounted.join("own"), own, what);
    }
    env.umount(&mounted_a);
    env.umount(&mounted_b);

    env.ok(&["snapshot_destroy", "--id", &id]);
    let snapshot_files = env.wait_image_loops_gone();
    assert!(
        listing(&snapshot_files).is_empty(),
        "image files after destroy"
    );
    // Read the origins back from their devices.
    env.remount(&a_loop, &origin_a, &[]);
    env.remount(&b_loop, &origin_b, &[]);
    verify(
        &origin_a.join("data"),
        &merged(&early_a, &late_a),
        "ext4 origin",
    );
    verify(
        &origin_b.join("data"),
        &merged(&early_b, &late_b),
        "xfs origin",
    );
    assert!(
        !origin_a.join("own").exists(),
        "image writes reached origin a"
    );
    assert!(
        !origin_b.join("own").exists(),
        "image writes reached origin b"
    );
}

// ---------------------------------------------------------------------------
// 2. Every kind of difference storage.

/// One snapshot over the mounted ext4 origin: files written before the take
/// must be exactly what the image shows, whatever the origin gets after.
struct Round<'a> {
    env: &'a Env,
    device: &'a str,
    origin: &'a Path,
    label: &'a str,
    before: Sums,
}

impl<'a> Round<'a> {
    fn begin(env: &'a Env, device: &'a str, origin: &'a Path, label: &'a str, seed: u64) -> Self {
        let before = write_files(&origin.join(label), "before", 5, MIB, seed);
        sync_fs(origin);
        Self {
            env,
            device,
            origin,
            label,
            before,
        }
    }

    fn create(&self, storage: &[&str]) -> String {
        let mut args = vec!["--device", self.device];
        args.extend(storage);
        self.env.create(&args)
    }

    /// `mib` MiB more on the origin, in 1 MiB files, then syncfs.
    fn write_after(&self, batch: usize, mib: usize) {
        let dir = self.origin.join(format!("{}-after", self.label));
        write_mib_files(&dir, &format!("after{batch}"), mib, 1000 + batch as u64);
        sync_fs(self.origin);
    }

    /// The image holds the files of before the take, and nothing after.
    fn check_image(&self) {
        let image = self.env.image_of(self.device);
        let mounted = self
            .env
            .mount(&image, &format!("image-{}", self.label), &[]);
        verify(
            &mounted.join(self.label),
            &self.before,
            &format!("image ({})", self.label),
        );
        assert!(!mounted.join(format!("{}-after", self.label)).exists());
        self.env.umount(&mounted);
        assert_eq!(
            self.env
                .ok(&[
                    "snapshot_info",
                    "--device",
                    self.device,
                    "--field",
                    "error_code"
                ])
                .trim(),
            "0"
        );
    }

    fn finish(&self, id: &str) {
        self.env.ok(&["snapshot_destroy", "--id", id]);
        verify(
            &self.origin.join(self.label),
            &self.before,
            &format!("origin ({})", self.label),
        );
        std::fs::remove_dir_all(self.origin.join(self.label)).unwrap();
        let _ = std::fs::remove_dir_all(self.origin.join(format!("{}-after", self.label)));
        sync_fs(self.origin);
    }
}

#[test]
fn difference_storage_variants() {
    const TEST: &str = "difference_storage_variants";
    const STEP: u64 = 8 * MIB;
    let Some(env) = Env::start_if_ready(TEST, &[], Some(SMALL_STEPS)) else {
        return;
    };
    let (dev, _, origin) = env.ext4_origin();

    // A regular file of 4 KiB (a length: --overwrite), grown in 8 MiB steps.
    {
        let file = env.file("diff.file", 4096);
        let round = Round::begin(&env, &dev, &origin, "file", 21);
        let id = round.create(&["--file", s(&file), "--limit", "1G", "--overwrite"]);
        env.take(&id);
        let mut totals = vec![env.storage_total(&dev)];
        for batch in 0..6 {
            round.write_after(batch, 4);
            totals.push(env.storage_total(&dev));
        }
        eprintln!("storage file totals: {totals:?}");
        for (i, total) in totals.iter().enumerate() {
            assert_eq!(
                total % STEP,
                4096,
                "storage total = the 4 KiB file + whole 8 MiB steps: {totals:?}"
            );
            if i > 0 {
                assert!(*total >= totals[i - 1], "storage shrank: {totals:?}");
            }
        }
        assert!(
            *totals.last().unwrap() >= 4096 + 24 * MIB,
            "24 MiB of copies need 3 steps at least: {totals:?}"
        );
        assert_eq!(
            std::fs::metadata(&file).unwrap().len(),
            *totals.last().unwrap(),
            "the file is as large as the storage"
        );
        round.check_image();
        round.finish(&id);
        assert_eq!(
            std::fs::metadata(&file).unwrap().len(),
            4096,
            "the storage file is given back after destroy"
        );
    }

    // A directory: an unnamed temporary file there.
    {
        let dir = env.dir("diff-dir");
        let round = Round::begin(&env, &dev, &origin, "dir", 22);
        let id = round.create(&["--file", s(&dir), "--limit", "1G"]);
        env.take(&id);
        round.write_after(0, 8);
        assert!(env.storage_total(&dev) >= 8 * MIB);
        round.check_image();
        round.finish(&id);
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            0,
            "the directory is empty after destroy"
        );
    }

    // A loop block device over a 64 MiB file, used whole.
    {
        let block = env.losetup(&env.file("diff-block.img", 64 * MIB));
        let round = Round::begin(&env, &dev, &origin, "block", 23);
        let id = round.create(&["--file", &block]);
        env.take(&id);
        round.write_after(0, 8);
        assert_eq!(env.storage_total(&dev), 64 * MIB);
        round.check_image();
        round.finish(&id);
        env.losetup_detach(&block);
    }

    // A file on tmpfs, grown from nothing.
    {
        let (tmpfs, out) = env.try_mount("tmpfs", "tmpfs", &["-t", "tmpfs", "-o", "size=40M"]);
        assert!(out.status.success(), "mount tmpfs: {out:?}");
        let file = tmpfs.join("diff");
        std::fs::File::create(&file).unwrap();
        let round = Round::begin(&env, &dev, &origin, "tmpfs", 24);
        let id = round.create(&["--file", s(&file), "--limit", "32M"]);
        env.take(&id);
        round.write_after(0, 8);
        let total = env.storage_total(&dev);
        assert!(
            total >= 8 * MIB && total % STEP == 0,
            "tmpfs storage total {total}"
        );
        assert_eq!(std::fs::metadata(&file).unwrap().len(), total);
        round.check_image();
        round.finish(&id);
        assert_eq!(std::fs::metadata(&file).unwrap().len(), 0);
        env.umount(&tmpfs);
    }

    // No storage at create; sector ranges of a file appended before the
    // take (a take needs room for a chunk) and after it.
    {
        let ranges = env.file("diff-ranges.img", 64 * MIB);
        let round = Round::begin(&env, &dev, &origin, "ranges", 25);
        let id = round.create(&[]);
        assert_eq!(env.storage_total(&dev), 0);
        env.append_storage(&id, &ranges, &["2048:32768"]);
        env.take(&id);
        env.append_storage(&id, &ranges, &["40960:32768"]);
        let info = env.info(&dev);
        assert_eq!(info["storage"]["total"], 32 * MIB, "{info}");
        assert_eq!(info["storage"]["extents"], 2, "{info}");
        round.write_after(0, 8);
        assert!(env.info(&dev)["storage"]["used"].as_u64().unwrap() >= 8 * MIB);
        round.check_image();
        round.finish(&id);
    }
}

/// Storage appended right after the take, with the origin mounted
/// read-write as usual: a take with no storage at all is refused (the thaw
/// right after it would corrupt the image at once); with one chunk of
/// storage the take goes through, the writes that need more wait for the
/// append (the `no_space` event, then `snapshot_appendstorage`, as the
/// original tool's watcher does), and the image survives.
#[test]
fn storage_appended_after_take_with_origin_mounted() {
    const TEST: &str = "storage_appended_after_take_with_origin_mounted";
    let Some(env) = Env::start_if_ready(TEST, &[], None) else {
        return;
    };
    let (dev, _, origin) = env.ext4_origin();
    let round = Round::begin(&env, &dev, &origin, "ranges", 26);
    let ranges = env.file("diff-ranges.img", 64 * MIB);
    let id = round.create(&[]);
    let refused = env.fails(
        &["snapshot_take", "--id", &id],
        &["ENOSPC", "snapshot_appendstorage"],
    );
    // The refused take thawed what it froze: the origin takes writes.
    std::fs::write(origin.join("after-refused-take"), b"thawed").unwrap();
    sync_fs(&origin);
    // One chunk (256 KiB) of storage: enough for the take, not for the
    // thaw and the writes after it.
    env.append_storage(&id, &ranges, &["0:512"]);
    let taken = env.take(&id);
    assert_eq!(
        taken["frozen"],
        serde_json::json!([s(&origin)]),
        "{taken}\n{refused}"
    );
    env.append_storage(&id, &ranges, &["512:65024"]);
    assert_eq!(
        env.ok(&["snapshot_info", "--device", &dev, "--field", "error_code"])
            .trim(),
        "0",
        "image corrupted before the storage could be appended:\n{}",
        env.log_tail()
    );
    round.write_after(1, 8);
    round.check_image();
    round.finish(&id);
}

// ---------------------------------------------------------------------------
// 3. Overflow: the image is lost, never the origin's writes.

#[test]
fn storage_overflow_corrupts_only_the_image() {
    const TEST: &str = "storage_overflow_corrupts_only_the_image";
    let Some(env) = Env::start_if_ready(TEST, &[], Some(SMALL_STEPS)) else {
        return;
    };
    let (dev, dev_loop, origin) = env.ext4_origin();
    let base = write_files(&origin.join("base"), "base", 5, MIB, 31);
    sync_fs(&origin);

    let storage = env.file("diff.file", 4096);
    let id = env.create(&[
        "--device",
        &dev,
        "--file",
        s(&storage),
        "--limit",
        "8M",
        "--overwrite",
    ]);
    env.take(&id);
    let waits = env.waits(&id);
    let watcher = env.spawn_cli(&["snapshot_watcher", "--id", &id], "watcher");
    env.wait_watching(&id, waits);

    // 32 MiB: four times the limit. Every write must succeed.
    let bulk = write_mib_files(&origin.join("bulk"), "bulk", 32, 32);
    sync_fs(&origin);

    let status = env.wait_child(watcher, Duration::from_secs(30));
    let out = std::fs::read_to_string(env.work.join("watcher.out")).unwrap();
    let err = std::fs::read_to_string(env.work.join("watcher.err")).unwrap();
    // As the original's watcher: the message, then a clean exit.
    assert_eq!(status.code(), Some(0), "watcher: {out}{err}");
    assert!(
        out.contains(&format!(
            " - The snapshot was corrupted for device [{dev}] with error \"No space left on device\".\n"
        )),
        "{out}"
    );
    assert!(out.ends_with("Snapshot watcher finished\n"), "{out}");
    let info = env.info(&dev);
    assert_eq!(info["storage"]["total"], 8 * MIB, "the limit holds: {info}");
    assert_eq!(
        env.ok(&["snapshot_info", "--device", &dev, "--field", "error_code"])
            .trim(),
        "-28"
    );

    // The image fails loudly, both read raw and mounted.
    let image = env.image_of(&dev);
    let read = run(
        "dd",
        &[
            &format!("if={image}"),
            "of=/dev/null",
            "bs=64K",
            "count=16",
            "iflag=direct",
        ],
    );
    assert!(
        !read.status.success(),
        "reading the corrupted image succeeded"
    );
    let stderr = String::from_utf8_lossy(&read.stderr);
    assert!(stderr.contains("Input/output error"), "{stderr}");
    let (mount_point, mounted) = env.try_mount(&image, "image", &["-o", "ro"]);
    assert!(
        !mounted.status.success(),
        "mounting the corrupted image succeeded"
    );
    assert!(!is_mounted(&mount_point));

    // The origin has every write, read back from the device.
    env.remount(&dev_loop, &origin, &[]);
    verify(&origin.join("base"), &base, "origin");
    verify(&origin.join("bulk"), &bulk, "origin");
    env.ok(&["snapshot_destroy", "--id", &id]);
}

// ---------------------------------------------------------------------------
// 4. Change tracking: the readable map, and markdirtyblock --file.

/// Tracking blocks (of `block` bytes) that sector ranges touch.
fn blocks_of(ranges: &[(u64, u64)], block: u64) -> BTreeSet<u64> {
    ranges
        .iter()
        .flat_map(|&(start, count)| (start * 512 / block)..=((start + count) * 512 - 1) / block)
        .collect()
}

/// A file's extents as sector ranges, from `filefrag -v`.
fn filefrag_ranges(file: &Path) -> Vec<(u64, u64)> {
    let out = run_ok("filefrag", &["-v", s(file)]);
    let block: u64 = out
        .split("blocks of ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no block size in {out}"));
    out.lines()
        .filter_map(|line| {
            // "   0:        0..     174:      34816..     34990:    175:   last,eof"
            let fields: Vec<&str> = line.split(':').map(str::trim).collect();
            fields.first()?.parse::<u64>().ok()?;
            let (first, last) = fields.get(2)?.split_once("..")?;
            let first: u64 = first.trim().parse().ok()?;
            let last: u64 = last.trim().parse().ok()?;
            Some((first * block / 512, (last + 1 - first) * block / 512))
        })
        .collect()
}

#[test]
fn cbt_map_and_markdirtyblock_file() {
    const TEST: &str = "cbt_map_and_markdirtyblock_file";
    let Some(env) = Env::start_if_ready(TEST, &["filefrag"], None) else {
        return;
    };
    let (dev, dev_loop, origin) = env.ext4_origin();
    write_files(&origin.join("a"), "a", 10, MIB, 41);
    sync_fs(&origin);
    let storage = env.dir("storage");
    let cbtinfo = || parse_json(&env.ok(&["cbtinfo", "--device", &dev, "--json"]));
    let map = |name: &str| {
        let path = env.work.join(name);
        env.ok(&["readcbtmap", "--device", &dev, "--file", s(&path)]);
        std::fs::read(path).unwrap()
    };
    let info = cbtinfo();
    let block = info["block_size"].as_u64().unwrap();
    assert_eq!(block, 64 << 10, "{info}");
    assert_eq!(info["block_count"], 64 * MIB / block, "{info}");

    // The readable map stays as it was at the take while the snapshot is
    // held, whatever is written meanwhile.
    let first = env.snapshot(&dev, &storage);
    let c1 = cbtinfo()["changes_number"].as_u64().unwrap();
    let held = map("held-1.map");
    assert!(
        held.iter().any(|&b| b > 0),
        "the writes before the take show"
    );
    write_files(&origin.join("b"), "b", 10, MIB, 42);
    let target = origin.join("b").join("target");
    std::fs::write(&target, Pattern::RandomFill.bytes(43, 700 << 10)).unwrap();
    sync_fs(&origin);
    assert_eq!(
        map("held-2.map"),
        held,
        "the readable map changed while held"
    );
    env.ok(&["snapshot_destroy", "--id", &first]);

    // From here nothing may write to the origin but markdirtyblock: the
    // filesystem is remounted read-only (which flushes its journal and
    // writes its superblock now, before the next take; ext4 never writes to
    // a read-only mount, and freezing one is a no-op), and it was made
    // without lazy initialization, so no kernel thread writes either.
    run_ok("mount", &["-o", "remount,ro", s(&origin)]);
    let second = env.snapshot(&dev, &storage);
    let c2 = cbtinfo()["changes_number"].as_u64().unwrap();
    assert!(c2 > c1, "changes_number {c1} -> {c2}");
    let after_writes = map("after-writes.map");
    assert!(
        after_writes.iter().any(|&b| b as u64 > c1),
        "the writes made while the first snapshot was held show after the next take"
    );

    let marked = parse_json(&env.ok(&[
        "markdirtyblock",
        // The loop device names the tracked device too.
        "--device",
        &dev_loop,
        "--file",
        s(&target),
        "--json",
    ]));
    let ranges: Vec<(u64, u64)> = marked["ranges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["start"].as_u64().unwrap(), r["count"].as_u64().unwrap()))
        .collect();
    let expected = blocks_of(&filefrag_ranges(&target), block);
    assert!(!expected.is_empty());
    assert_eq!(
        blocks_of(&ranges, block),
        expected,
        "FIEMAP ranges {ranges:?} against filefrag"
    );
    assert_eq!(marked["device"], dev_loop.as_str(), "{marked}");
    eprintln!(
        "{} extent(s) {ranges:?} in tracking blocks {expected:?}",
        ranges.len()
    );
    // The original's way: no --device, the file's filesystem names it; its
    // lines tell the file's device and the ranges marked (the same again).
    let loop_rdev = std::fs::metadata(&dev_loop).unwrap().rdev();
    let text = env.ok(&["markdirtyblock", "--file", s(&target)]);
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some(
            format!(
                "device path: '/dev/block/{}:{}'",
                rustix::fs::major(loop_rdev),
                rustix::fs::minor(loop_rdev)
            )
            .as_str()
        ),
        "{text}"
    );
    let listed: Vec<String> = lines.map(str::to_string).collect();
    let wanted: Vec<String> = ranges
        .iter()
        .map(|(start, count)| format!("allocate range: ofs={start} cnt={count}"))
        .collect();
    assert_eq!(listed, wanted, "{text}");
    // As with the original, the marks show at once in the held snapshot's
    // map, at its change number: a backup made from it includes them.
    let held_marked = map("held-marked.map");
    for (b, (&was, &now)) in after_writes.iter().zip(&held_marked).enumerate() {
        let want = if expected.contains(&(b as u64)) {
            was.max(c2 as u8)
        } else {
            was
        };
        assert_eq!(now, want, "block {b} of the held map after markdirtyblock");
    }
    env.ok(&["snapshot_destroy", "--id", &second]);
    let third = env.snapshot(&dev, &storage);
    let next = map("marked.map");
    let changed: BTreeSet<u64> = changed_since(&next, c2)
        .into_iter()
        .map(|i| i as u64)
        .collect();
    assert_eq!(
        changed, expected,
        "blocks changed since take {c2}: exactly the file's blocks"
    );
    env.ok(&["snapshot_destroy", "--id", &third]);
}

#[test]
fn snapshot_create_of_a_mounted_device_says_to_attach_with_loop() {
    const TEST: &str = "snapshot_create_of_a_mounted_device_says_to_attach_with_loop";
    let Some(env) = Env::start_if_ready(TEST, &[], None) else {
        return;
    };
    // The original attaches a device named by snapshot_create; ours does
    // too, but a mounted block device cannot be opened exclusively, and
    // its writes would never pass through us anyway.
    let raw = env.losetup(&env.file("raw.img", 64 * MIB));
    env.mkfs(Fs::Ext4, &raw);
    let mounted = env.mount(&raw, "raw", &[]);
    let storage = env.dir("storage");
    let out = env.fails(
        &["snapshot_create", "-d", &raw, "-f", s(&storage)],
        &["EBUSY", &raw, "--loop", "mount its loop device"],
    );
    assert_eq!(out.lines().count(), 1, "one line: {out}");
    let list = parse_json(&env.ok(&["list", "--json"]));
    assert_eq!(list["devices"], serde_json::json!([]), "{list}");
    assert_eq!(list["snapshots"], serde_json::json!([]), "{list}");
    env.umount(&mounted);
    // Unmounted, the same command attaches it and makes the snapshot.
    let id = env.ok(&["snapshot_create", "-d", &raw, "-f", s(&storage)]);
    let list = parse_json(&env.ok(&["list", "--json"]));
    assert_eq!(list["devices"][0]["path"], raw.as_str(), "{list}");
    env.ok(&["snapshot_destroy", "-i", id.trim()]);
    env.ok(&["detach", "-d", &raw]);
    env.losetup_detach(&raw);
}

// ---------------------------------------------------------------------------
// 5. Concurrent I/O on the origin and the image; destroy under load.

/// Pieces the concurrent writers write: half a chunk (256 KiB here), so
/// copies of partly written chunks are exercised.
const PIECE: u64 = 128 << 10;

/// `dd` of block `index` (of `bs` bytes) of the pattern file onto the
/// device at the same place, direct I/O.
fn dd_block(pattern: &Path, device: &str, bs: u64, index: u64) -> Output {
    run(
        "dd",
        &[
            &format!("if={}", s(pattern)),
            &format!("of={device}"),
            &format!("bs={bs}"),
            "count=1",
            &format!("skip={index}"),
            &format!("seek={index}"),
            "oflag=direct",
            "status=none",
        ],
    )
}

fn read_device(device: &str, into: &Path) -> Vec<u8> {
    run_ok(
        "dd",
        &[
            &format!("if={device}"),
            &format!("of={}", s(into)),
            "bs=1M",
            "iflag=direct",
            "status=none",
        ],
    );
    std::fs::read(into).unwrap()
}

/// Compares a device's content piece by piece against the expected
/// (pattern name, pattern) of each piece; names what was found where it
/// differs.
fn compare(what: &str, got: &[u8], expected: &[(&str, &[u8])], known: &[(&str, &[u8])]) {
    let piece = PIECE as usize;
    assert_eq!(got.len(), expected.len() * piece, "{what}: size");
    let mut wrong = Vec::new();
    for (i, (name, pattern)) in expected.iter().enumerate() {
        let r = i * piece..(i + 1) * piece;
        if got[r.clone()] != pattern[r.clone()] {
            let found = known
                .iter()
                .find(|(_, p)| p[r.clone()] == got[r.clone()])
                .map_or("unknown data", |(n, _)| n);
            wrong.push(format!(
                "{} KiB: expected {name}, found {found}",
                r.start >> 10
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{what}: {} of {} pieces wrong: {:#?}",
        wrong.len(),
        expected.len(),
        &wrong[..wrong.len().min(20)]
    );
}

/// Checks what a read of the image at `offset` got: every 4 KiB page is
/// the image's content at the take, or what its writer writes there (D); a
/// read never returns anything else, not even while the image is destroyed.
fn check_image_read(got: &[u8], offset: u64, taken: &[u8], d: &[u8]) -> Result<(), String> {
    const PAGE: usize = 4096;
    let offset = offset as usize;
    if got.is_empty() || got.len() % PAGE != 0 || offset + got.len() > taken.len() {
        return Err(format!(
            "image read at {offset}: {} bytes, not whole pages inside the image",
            got.len()
        ));
    }
    for (i, page) in got.chunks(PAGE).enumerate() {
        let r = offset + i * PAGE..offset + (i + 1) * PAGE;
        if page != &taken[r.clone()] && page != &d[r.clone()] {
            return Err(format!(
                "image read: the page at {} KiB is neither the take's content nor the image writer's",
                r.start >> 10
            ));
        }
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq)]
enum Role {
    /// I/O on the origin: must never fail.
    Origin,
    /// I/O on the image: may fail once the destroy began, not before.
    Image,
}

/// Threads running one command after another until stopped; stopped and
/// waited for (bounded) when dropped, so none outlives the test's devices.
/// A job returns the command's output, or `Err` when the command succeeded
/// with wrong results (a failure whenever it happens).
#[derive(Default)]
struct Workers {
    stop: Arc<AtomicBool>,
    destroying: Arc<AtomicBool>,
    image_errors: Arc<AtomicU64>,
    /// Commands each thread has finished so far.
    progress: Vec<Arc<AtomicU64>>,
    handles: Vec<std::thread::JoinHandle<Result<u64, String>>>,
}

impl Workers {
    fn spawn(&mut self, role: Role, job: impl Fn(u64) -> Result<Output, String> + Send + 'static) {
        let (stop, destroying, image_errors) = (
            self.stop.clone(),
            self.destroying.clone(),
            self.image_errors.clone(),
        );
        let progress = Arc::new(AtomicU64::new(0));
        self.progress.push(progress.clone());
        self.handles.push(std::thread::spawn(move || {
            let mut done = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let out = job(done)?;
                if !out.status.success() {
                    let error = String::from_utf8_lossy(&out.stderr).into_owned();
                    if role == Role::Origin {
                        return Err(format!("origin I/O failed: {error}"));
                    }
                    if !destroying.load(Ordering::SeqCst) {
                        return Err(format!("image I/O failed before the destroy: {error}"));
                    }
                    image_errors.fetch_add(1, Ordering::SeqCst);
                }
                done += 1;
                progress.store(done, Ordering::SeqCst);
            }
            Ok(done)
        }));
    }

    /// How many commands each thread has finished so far.
    fn progress(&self) -> Vec<u64> {
        self.progress
            .iter()
            .map(|p| p.load(Ordering::SeqCst))
            .collect()
    }

    /// Waits (bounded) until every thread has finished `more` commands
    /// beyond `since` (from [`Self::progress`]), or one has ended (failed).
    fn wait_progress(&self, since: &[u64], more: u64, limit: Duration) {
        let reached = wait_until(limit, || {
            self.handles.iter().any(|h| h.is_finished())
                || self
                    .progress()
                    .iter()
                    .zip(since)
                    .all(|(now, then)| *now >= then + more)
        });
        assert!(
            reached,
            "the I/O threads did not make progress within {limit:?}: {:?} since {since:?}",
            self.progress()
        );
    }

    /// Stops every thread; returns how many commands each ran.
    fn finish(&mut self) -> Vec<u64> {
        self.stop.store(true, Ordering::SeqCst);
        assert!(
            wait_until(Duration::from_secs(30), || self
                .handles
                .iter()
                .all(|h| h.is_finished())),
            "I/O does not finish: something hangs"
        );
        self.handles
            .drain(..)
            .map(|h| h.join().unwrap().unwrap())
            .collect()
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if !wait_until(Duration::from_secs(70), || {
            self.handles.iter().all(|h| h.is_finished())
        }) {
            loud("I/O threads still run");
        }
    }
}

#[test]
fn concurrent_origin_and_image_io_and_destroy() {
    const TEST: &str = "concurrent_origin_and_image_io_and_destroy";
    let Some(env) = Env::start_if_ready(TEST, &["blkdiscard"], None) else {
        return;
    };
    // 64 MiB of content for each pattern.
    let [a, b, c, d] = [0xA, 0xB, 0xC, 0xD].map(|tag| Pattern::RandomFill.bytes(tag, 64 * MIB));
    let zeros = vec![0u8; 64 * MIB as usize];
    let known: [(&str, &[u8]); 5] = [
        ("A", &a),
        ("B", &b),
        ("C", &c),
        ("D", &d),
        ("zeros", &zeros),
    ];
    let origin_file = env.work.join("origin.img");
    std::fs::write(&origin_file, &a).unwrap();
    let files: Vec<PathBuf> = [("B", &b), ("C", &c), ("D", &d)]
        .iter()
        .map(|(name, data)| {
            let path = env.work.join(format!("pattern-{name}"));
            std::fs::write(&path, data).unwrap();
            path
        })
        .collect();
    let (pat_b, pat_c, pat_d) = (files[0].clone(), files[1].clone(), files[2].clone());
    let (dev, origin) = env.attach_loop(&origin_file);
    let storage = env.dir("storage");
    let id = env.snapshot(&dev, &storage);
    let image = env.image_of(&dev);

    // At the same time, in shuffled 128 KiB pieces: the origin gets B over
    // 0..48 MiB; the image gets C over two pieces in three of 16..64 MiB.
    // Over 16..48 MiB both write, and the image leaves some chunks half
    // written: those halves must still be A, whatever the origin got.
    const PIECES: u64 = 64 * MIB / PIECE;
    let origin_pieces = |p: u64| p < 48 * MIB / PIECE;
    let image_pieces = |p: u64| p >= 16 * MIB / PIECE && p % 3 != 0;
    let writer = |pattern: PathBuf, device: String, mut pieces: Vec<u64>, seed| {
        std::thread::spawn(move || {
            fastrand::Rng::with_seed(seed).shuffle(&mut pieces);
            for p in pieces {
                let out = dd_block(&pattern, &device, PIECE, p);
                if !out.status.success() {
                    return Err(format!(
                        "dd piece {p} to {device}: {}",
                        String::from_utf8_lossy(&out.stderr)
                    ));
                }
            }
            Ok(())
        })
    };
    let origin_writer = writer(
        pat_b.clone(),
        origin.clone(),
        (0..PIECES).filter(|&p| origin_pieces(p)).collect(),
        51,
    );
    let image_writer = writer(
        pat_c.clone(),
        image.clone(),
        (0..PIECES).filter(|&p| image_pieces(p)).collect(),
        52,
    );
    origin_writer.join().unwrap().unwrap();
    image_writer.join().unwrap().unwrap();
    // Discard and zero-out reach the origin through FUSE fallocate; the
    // image keeps its data there.
    run_ok("blkdiscard", &["-o", "48M", "-l", "4M", &origin]);
    run_ok("blkdiscard", &["-z", "-o", "52M", "-l", "4M", &origin]);

    let origin_expected: Vec<(&str, &[u8])> = (0..PIECES)
        .map(|p| {
            if origin_pieces(p) {
                ("B", &b[..])
            } else if p < 56 * MIB / PIECE {
                ("zeros", &zeros[..])
            } else {
                ("A", &a[..])
            }
        })
        .collect();
    let image_expected: Vec<(&str, &[u8])> = (0..PIECES)
        .map(|p| {
            if image_pieces(p) {
                ("C", &c[..])
            } else {
                ("A", &a[..])
            }
        })
        .collect();
    let read_into = env.work.join("read.bin");
    compare(
        "origin",
        &read_device(&origin, &read_into),
        &origin_expected,
        &known,
    );
    compare(
        "image",
        &read_device(&image, &read_into),
        &image_expected,
        &known,
    );
    env.ok(&["snapshot_destroy", "--id", &id]);

    // A new snapshot; readers and a writer on its image, a writer on the
    // origin (B again over 0..48: copies race the destroy, the content stays
    // the same); destroy in the middle of it all.
    let id = env.snapshot(&dev, &storage);
    let image = env.image_of(&dev);
    // Held open until the I/O stops, so the loop device stays ours (detached
    // lazily) and no later dd can reach a loop device reused by others.
    let hold = std::fs::File::open(&image).unwrap();
    // What the image holds at the take (the origin then), and where its
    // writer goes, D: every 4 KiB page a reader gets must be one of them.
    let taken: Arc<Vec<u8>> = Arc::new(
        origin_expected
            .iter()
            .enumerate()
            .flat_map(|(i, (_, p))| p[i * PIECE as usize..(i + 1) * PIECE as usize].to_vec())
            .collect(),
    );
    let d = Arc::new(d.clone());
    let mut workers = Workers::default();
    for r in 0..2u64 {
        let image = image.clone();
        let into = env.work.join(format!("reader-{r}.bin"));
        let (taken, d) = (taken.clone(), d.clone());
        workers.spawn(Role::Image, move |i| {
            let skip = (i * 7 + r * 29) % 56;
            let _ = std::fs::remove_file(&into);
            let out = run(
                "dd",
                &[
                    &format!("if={image}"),
                    &format!("of={}", s(&into)),
                    "bs=1M",
                    "count=8",
                    &format!("skip={skip}"),
                    "iflag=direct",
                    "status=none",
                ],
            );
            if out.status.success() {
                check_image_read(&std::fs::read(&into).unwrap(), skip * MIB, &taken, &d)?;
            }
            Ok(out)
        });
    }
    {
        let (image, pat_d) = (image.clone(), pat_d.clone());
        workers.spawn(Role::Image, move |i| {
            Ok(dd_block(&pat_d, &image, MIB, (i * 13) % 64))
        });
    }
    {
        let (origin, pat_b) = (origin.clone(), pat_b.clone());
        workers.spawn(Role::Origin, move |i| {
            Ok(dd_block(&pat_b, &origin, MIB, (i * 11) % 48))
        });
    }
    // The destroy comes under load: once every thread has done some I/O.
    let none = workers.progress().iter().map(|_| 0).collect::<Vec<_>>();
    workers.wait_progress(&none, 3, Duration::from_secs(60));
    workers.destroying.store(true, Ordering::SeqCst);
    let started = Instant::now();
    env.ok(&["snapshot_destroy", "--id", &id]);
    let destroy_took = started.elapsed();
    // And the I/O goes on against the destroyed image for a while.
    let at_destroy = workers.progress();
    workers.wait_progress(&at_destroy, 2, Duration::from_secs(60));
    let counts = workers.finish();
    drop(hold);
    assert!(
        destroy_took < Duration::from_secs(20),
        "destroy took {destroy_took:?}"
    );
    assert!(
        counts.iter().all(|&n| n > 0),
        "every worker ran: {counts:?}"
    );
    eprintln!(
        "destroy under load: {destroy_took:?}, operations {counts:?}, image errors after the destroy began {}",
        workers.image_errors.load(Ordering::SeqCst)
    );
    assert!(running(env.pid), "blksnapd died:\n{}", env.log_tail());
    env.ok(&["version"]);
    assert_eq!(env.ok(&["snapshot_collect"]).trim(), "");
    env.wait_image_loops_gone();
    compare(
        "origin after destroy",
        &read_device(&origin, &read_into),
        &origin_expected,
        &known,
    );
}

// ---------------------------------------------------------------------------
// 6. The daemon does not stop under a mounted filesystem.

/// Direct writes queued on the loop device all at once (the FUSE files do
/// asynchronous direct I/O, so the loop device has many requests in flight
/// in the daemon): every one reaches the engine. The change map marks
/// exactly their tracking blocks, a snapshot taken after them holds them,
/// and overwrites queued while it is held are copied first (the image still
/// holds the data of the take).
#[test]
fn queued_loop_writes_reach_the_engine() {
    const TEST: &str = "queued_loop_writes_reach_the_engine";
    let Some(env) = Env::start_if_ready(TEST, &[], None) else {
        return;
    };
    const BLOCK: u64 = 64 << 10;
    let [a, b, c] = [0x1A, 0x1B, 0x1C].map(|tag| Pattern::RandomFill.bytes(tag, 16 * MIB));
    let origin_file = env.work.join("origin.img");
    std::fs::write(&origin_file, &a).unwrap();
    let [pat_b, pat_c] = [("B", &b), ("C", &c)].map(|(name, data)| {
        let path = env.work.join(format!("pattern-{name}"));
        std::fs::write(&path, data).unwrap();
        path
    });
    let (dev, dev_loop) = env.attach_loop(&origin_file);
    let storage = env.dir("storage");
    let changes = || {
        parse_json(&env.ok(&["cbtinfo", "--device", &dev, "--json"]))["changes_number"]
            .as_u64()
            .unwrap()
    };
    // A take moves the change number on: blocks written after it are the
    // ones changed since.
    let first = env.snapshot(&dev, &storage);
    let since = changes();
    env.ok(&["snapshot_destroy", "--id", &first]);

    // 48 tracking blocks, every third one, written by as many writers at
    // once.
    let blocks: Vec<u64> = (0..48).map(|i| i * 3 + 1).collect();
    let loop_path = dev_loop.as_str();
    let write_all = |pattern: &Path| {
        std::thread::scope(|scope| {
            for &block in &blocks {
                scope.spawn(move || {
                    let out = dd_block(pattern, loop_path, BLOCK, block);
                    assert!(out.status.success(), "dd of block {block}: {out:?}");
                });
            }
        })
    };
    write_all(&pat_b);
    let mut expected = a.clone();
    for &block in &blocks {
        let r = (block * BLOCK) as usize..((block + 1) * BLOCK) as usize;
        expected[r.clone()].copy_from_slice(&b[r]);
    }
    let got = read_device(&dev_loop, &env.work.join("origin-read"));
    assert!(got == expected, "the origin does not read as written");

    let second = env.snapshot(&dev, &storage);
    let map_path = env.work.join("after.map");
    env.ok(&["readcbtmap", "--device", &dev, "--file", s(&map_path)]);
    let changed: BTreeSet<u64> = changed_since(&std::fs::read(&map_path).unwrap(), since)
        .into_iter()
        .map(|i| i as u64)
        .collect();
    assert_eq!(
        changed,
        blocks.iter().copied().collect::<BTreeSet<u64>>(),
        "blocks changed since take {since}: exactly those written"
    );
    let image = env.image_of(&dev);
    let taken = read_device(&image, &env.work.join("image-read-1"));
    assert!(
        taken == expected,
        "the image does not hold the writes before the take"
    );

    // Overwrites of the same blocks, all at once, while the snapshot is
    // held: each chunk is copied before it is overwritten.
    write_all(&pat_c);
    let mut now = expected.clone();
    for &block in &blocks {
        let r = (block * BLOCK) as usize..((block + 1) * BLOCK) as usize;
        now[r.clone()].copy_from_slice(&c[r]);
    }
    let got = read_device(&dev_loop, &env.work.join("origin-read-2"));
    assert!(got == now, "the origin does not read as overwritten");
    let image_now = read_device(&image, &env.work.join("image-read-2"));
    assert!(image_now == expected, "the image changed with the origin");
    env.ok(&["snapshot_destroy", "--id", &second]);
}

#[test]
fn clean_stop_waits_for_unmount() {
    const TEST: &str = "clean_stop_waits_for_unmount";
    let Some(mut env) = Env::start_if_ready(TEST, &[], None) else {
        return;
    };
    let (dev, dev_loop, origin) = env.ext4_origin();
    let files = write_files(&origin.join("data"), "f", 3, MIB, 61);
    sync_fs(&origin);

    common::signal(env.pid, "TERM");
    assert!(
        wait_until(Duration::from_secs(5), || env
            .log()
            .contains("not stopping")),
        "no refusal in the log:\n{}",
        env.log_tail()
    );
    // The refusal is the signal's whole handling (the signal thread goes
    // back to waiting): the daemon answers after it and still runs.
    assert_eq!(env.ok(&["version"]).trim(), env!("CARGO_PKG_VERSION"));
    assert!(
        running(env.pid),
        "blksnapd stopped under a mounted filesystem"
    );
    let refusal = env
        .log()
        .lines()
        .find(|l| l.contains("not stopping"))
        .unwrap()
        .to_string();
    assert!(
        refusal.contains(&dev) && refusal.contains(&dev_loop),
        "{refusal}"
    );
    env.fails(&["shutdown"], &["EBUSY", &dev_loop]);
    // (A detach of the mounted device succeeds, as the original's does:
    // `detach_of_a_mounted_device_keeps_serving_it`.)
    assert!(running(env.pid));
    verify(&origin.join("data"), &files, "origin");

    env.umount(&origin);
    let status = env.sigterm_stop();
    assert!(status.success(), "{status}");
    assert!(env.log().contains("blksnapd stopped"), "{}", env.log_tail());
    assert!(!is_mounted(&env.fuse_dir), "FUSE mount left behind");
    assert_eq!(
        loops_under(&env.fuse_dir),
        Vec::<String>::new(),
        "loop devices left behind"
    );
}

// ---------------------------------------------------------------------------
// 7. Claims of docs/blksnapd.md about the local devices that had no test.

/// Thaws a filesystem frozen by the test, also when the test fails (an
/// unmount of a frozen filesystem would hang).
struct Thaw(PathBuf);

impl Drop for Thaw {
    fn drop(&mut self) {
        let _ = try_run("fsfreeze", &["-u", s(&self.0)]);
    }
}

/// The FUSE files: other users get `EACCES`, `truncate` gets `ENOSYS`.
#[test]
fn fuse_files_refuse_others_and_truncate() {
    const TEST: &str = "fuse_files_refuse_others_and_truncate";
    let Some(env) = Env::start_if_ready(TEST, &["setpriv", "stat", "ls", "cat", "truncate"], None)
    else {
        return;
    };
    let file = env.file("a.img", 4 * MIB);
    assert!(env
        .ok(&["attach", "--device", s(&file), "--no-loop"])
        .contains("device=a.img\n"));
    let fuse_file = env.fuse_dir.join("a.img");
    // Another user: the path up to the mount is open to all (the work
    // directory is the test's own), the filesystem is not. Checked before
    // root looks at the file: within the 1 s attribute timeout after root
    // did, another user's `stat` is answered from the kernel's cache,
    // without asking the daemon (reported; `open` is always asked).
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&env.work, std::fs::Permissions::from_mode(0o755)).unwrap();
    let as_nobody = |tool: [&str; 2]| {
        let args: Vec<&str> = ["--reuid=65534", "--regid=65534", "--clear-groups"]
            .into_iter()
            .chain(tool)
            .collect();
        let out = run("setpriv", &args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "{tool:?} as nobody succeeded");
        assert!(stderr.contains("Permission denied"), "{tool:?}: {stderr}");
    };
    as_nobody(["stat", s(&fuse_file)]);
    as_nobody(["ls", s(&env.fuse_dir)]);
    as_nobody(["cat", s(&fuse_file)]);
    assert_eq!(std::fs::metadata(&fuse_file).unwrap().len(), 4 * MIB);
    as_nobody(["cat", s(&fuse_file)]);

    // truncate: ENOSYS, and the size stays.
    let open = std::fs::OpenOptions::new()
        .write(true)
        .open(&fuse_file)
        .unwrap();
    let err = open.set_len(MIB).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(38), "truncate: {err}");
    drop(open);
    assert_eq!(std::fs::metadata(&fuse_file).unwrap().len(), 4 * MIB);
    let out = run("truncate", &["-s", "8M", s(&fuse_file)]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Function not implemented"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Root still reads it.
    assert_eq!(std::fs::read(&fuse_file).unwrap().len() as u64, 4 * MIB);

    // (Reserved device names: claims_daemon.rs.)
    let list = parse_json(&env.ok(&["list", "--json"]));
    assert_eq!(list["devices"][0]["name"], "a.img", "{list}");
    assert!(env.fuse_dir.join("snapshot").is_dir());
}

/// `attach_loop = true` gives every attach (and the images of its device)
/// a loop device, unless it says `--no-loop`.
#[test]
fn attach_loop_setting_and_no_loop() {
    const TEST: &str = "attach_loop_setting_and_no_loop";
    let Some(env) = Env::start_if_ready(TEST, &[], Some("attach_loop = true\n")) else {
        return;
    };
    let a = env.file("a.img", 16 * MIB);
    let out = env.ok(&["attach", "--device", s(&a)]);
    let a_loop = out
        .lines()
        .find_map(|l| l.strip_prefix("loop="))
        .unwrap_or_else(|| panic!("no loop device with attach_loop = true: {out}"))
        .to_string();
    env.held()
        .daemon_loops
        .push((a_loop.clone(), "a.img".to_string()));
    assert!(a_loop.starts_with("/dev/loop"), "{out}");
    let b = env.file("b.img", 16 * MIB);
    let out = env.ok(&["attach", "--device", s(&b), "--no-loop"]);
    assert!(
        !out.contains("loop="),
        "--no-loop gave a loop device: {out}"
    );

    let list = parse_json(&env.ok(&["list", "--json"]));
    let loop_of = |name: &str| {
        list["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == name)
            .unwrap_or_else(|| panic!("no {name}: {list}"))
            .get("loop")
            .cloned()
    };
    assert_eq!(loop_of("a.img"), Some(Value::from(a_loop.as_str())));
    assert_eq!(loop_of("b.img"), None);
    // The device's image gets one at the take.
    let storage = env.dir("storage");
    let id = env.snapshot("a.img", &storage);
    let image = env.image_of("a.img");
    assert_ne!(image, a_loop);
    env.ok(&["snapshot_destroy", "--id", &id]);
    env.wait_image_loops_gone();
}

/// `freeze_on_take = false` freezes nothing; with the default, a
/// filesystem that cannot be frozen (frozen already) gives a warning and
/// the take goes on.
#[test]
fn freeze_on_take_false_and_the_freeze_failure_warning() {
    const TEST: &str = "freeze_on_take_false_and_the_freeze_failure_warning";
    {
        let Some(env) = Env::start_if_ready(TEST, &["fsfreeze"], Some("freeze_on_take = false\n"))
        else {
            return;
        };
        let (dev, _, _origin) = env.ext4_origin();
        let storage = env.dir("storage");
        let id = env.create(&["--device", &dev, "--file", s(&storage), "--limit", "1G"]);
        let taken = env.take(&id);
        assert_eq!(
            taken,
            serde_json::json!({"frozen": [], "warnings": []}),
            "freeze_on_take = false froze: {taken}"
        );
        assert!(
            !env.log().contains("filesystem frozen"),
            "{}",
            env.log_tail()
        );
    }

    let env = Env::start(TEST, None);
    let (dev, _, origin) = env.ext4_origin();
    run_ok("fsfreeze", &["-f", s(&origin)]);
    let thaw = Thaw(origin.clone());
    let storage = env.dir("storage");
    let id = env.create(&["--device", &dev, "--file", s(&storage), "--limit", "1G"]);
    let out = env.cli(&["snapshot_take", "--id", &id]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the take failed: {stderr}");
    let warning = format!(
        "blksnap: warning: cannot freeze the filesystem at {}",
        origin.display()
    );
    assert!(stderr.contains(&warning), "{stderr}");
    assert!(stderr.contains("taking the snapshot anyway"), "{stderr}");
    let info = env.info(&dev);
    assert_eq!(info["taken"], true, "{info}");
    assert_eq!(info["images"][0]["error_code"], 0, "{info}");
    drop(thaw);
    // Thawed by us, not by the take: the filesystem works.
    std::fs::write(origin.join("after"), b"written").unwrap();
    sync_fs(&origin);
}

/// `blksnap shutdown --force` stops a daemon whose loop device is mounted
/// (the plain `shutdown` refuses with EBUSY): status 0, the forced stop
/// logged, and no FUSE mount left on the directory (detached lazily).
#[test]
fn shutdown_force_with_a_busy_loop_device() {
    const TEST: &str = "shutdown_force_with_a_busy_loop_device";
    let Some(mut env) = Env::start_if_ready(TEST, &[], None) else {
        return;
    };
    let (_dev, dev_loop, origin) = env.ext4_origin();
    write_files(&origin.join("data"), "f", 2, MIB, 71);
    sync_fs(&origin);
    env.fails(&["shutdown"], &["EBUSY", &dev_loop]);
    assert!(running(env.pid));
    assert_eq!(env.ok(&["shutdown", "--force"]), "");
    assert!(
        wait_until(Duration::from_secs(30), || !running(env.pid)),
        "blksnapd did not stop on shutdown --force:\n{}",
        env.log_tail()
    );
    let status = env.daemon.as_mut().unwrap().stop_or_status();
    assert_eq!(status.code(), Some(0), "{}", env.log_tail());
    let log = env.log();
    assert!(
        log.contains("forced stop: loop devices detached while in use"),
        "{}",
        env.log_tail()
    );
    assert!(log.contains("blksnapd stopped"), "{}", env.log_tail());
    // The filesystem on the dead device goes first, then the FUSE mount.
    let _ = try_run("umount", &[s(&origin)]);
    if is_mounted(&origin) {
        let _ = try_run("umount", &["-l", s(&origin)]);
    }
    env.held().mounts.retain(|m| m != &origin);
    // Unlike docs/blksnap.md (`--force`) and docs/blksnapd.md ("After a
    // forced stop"), which say the FUSE filesystem stays mounted, dead,
    // until unmounted: the daemon detaches it lazily at its stop.
    assert!(
        log.contains("FUSE volumes still in use: unmounted lazily")
            || log.contains("FUSE volumes unmounted"),
        "{}",
        env.log_tail()
    );
    assert!(!is_mounted(&env.fuse_dir));
}

// ---------------------------------------------------------------------------
// 8. Loop devices never leak (issue 14 item 4), and the original's detach of
//    a mounted device (issue 16 item 5).

/// The loop devices bound to files under the FUSE directory, as device
/// paths, without those the running daemon lists as its own.
fn leftover_loops(env: &Env) -> Vec<String> {
    let list = env.list();
    let mut ours = BTreeSet::new();
    for d in list["devices"].as_array().unwrap() {
        if let Some(l) = d["loop"].as_str() {
            ours.insert(l.to_string());
        }
    }
    loops_under(&env.fuse_dir)
        .into_iter()
        .filter_map(|line| line.split_once(':').map(|(d, _)| d.to_string()))
        .filter(|d| !ours.contains(d))
        .collect()
}

/// A loop device's backing file, from sysfs; `None` once it is cleared.
fn backing_of(device: &str) -> Option<String> {
    let sys = format!(
        "/sys/block/{}/loop/backing_file",
        device.trim_start_matches("/dev/")
    );
    std::fs::read_to_string(sys)
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// kill -9 with loop devices attached: the daemon's own free loop device
/// goes with it (autoclear), a mounted one at its unmount, and one left
/// bound without autoclear (as an older daemon made them; here `losetup`
/// on a FUSE file) is detached by the next start.
#[test]
fn kill_9_leaves_no_loop_device_behind() {
    const TEST: &str = "kill_9_leaves_no_loop_device_behind";
    let Some(mut env) = Env::start_if_ready(TEST, &[], None) else {
        return;
    };
    let (_free, free_loop) = env.attach_loop(&env.file("free.img", 16 * MIB));
    let (_mounted, mounted_loop, origin) = env.ext4_origin();
    write_files(&origin.join("data"), "f", 2, MIB, 81);
    sync_fs(&origin);
    let old = env.file("old.img", 16 * MIB);
    env.ok(&["attach", "--device", s(&old), "--no-loop"]);
    let old_loop = env.losetup(&env.fuse_dir.join("old.img"));

    let dir = env.kill();
    // Autoclear: the daemon's descriptor was the free one's last. The
    // others stay: one without autoclear, one mounted.
    let fuse_file = |name: &str| Some(s(&env.fuse_dir.join(name)).to_string());
    assert!(
        wait_until(Duration::from_secs(5), || backing_of(&free_loop)
            != fuse_file("free.img")),
        "{free_loop} outlived the daemon"
    );
    assert_eq!(backing_of(&old_loop), fuse_file("old.img"));
    assert_eq!(backing_of(&mounted_loop), fuse_file("origin.img"));

    env.restart(dir);
    let log = env.log();
    assert!(
        log.contains("loop device left by an earlier blksnapd detached") && log.contains(&old_loop),
        "the leftover {old_loop} was not detached at start:\n{}",
        env.log_tail()
    );
    assert!(
        !log.lines()
            .any(|l| l.contains("left by an earlier") && l.contains(&format!("{free_loop} "))),
        "{free_loop} outlived the daemon without autoclear:\n{}",
        env.log_tail()
    );
    assert!(
        log.contains("still in use") && log.contains(&mounted_loop),
        "the mounted leftover {mounted_loop} was not reported:\n{}",
        env.log_tail()
    );
    env.held().loops.retain(|l| l != &old_loop);
    // (Its number may serve a restored device's new loop device by now.)
    assert_ne!(
        backing_of(&old_loop),
        Some(s(&env.fuse_dir.join("old.img")).to_string()),
        "{old_loop} still bound"
    );
    assert_eq!(
        leftover_loops(&env),
        Vec::<String>::new(),
        "loop devices bound under the FUSE directory after the restart, \
         besides the new daemon's own"
    );
    // The mounted one stays bound (to the dead mount, which the new start
    // unmounted lazily: the kernel names its file relative to it now).
    let bound = backing_of(&mounted_loop);
    assert!(
        bound.as_deref().is_some_and(|b| b.ends_with("/origin.img")),
        "{mounted_loop}: {bound:?}"
    );
    // Its filesystem lost its device with the daemon; the unmount is the
    // loop device's last close.
    let _ = try_run("umount", &[s(&origin)]);
    if is_mounted(&origin) {
        let _ = try_run("umount", &["-l", s(&origin)]);
    }
    env.held().mounts.retain(|m| m != &origin);
    assert!(
        wait_until(Duration::from_secs(5), || backing_of(&mounted_loop)
            .is_none()),
        "{mounted_loop} left after the unmount: {:?}",
        backing_of(&mounted_loop)
    );
    assert_eq!(leftover_loops(&env), Vec::<String>::new());
    // The restored devices have new loop devices, and they work.
    let list = env.list();
    assert_eq!(list["devices"].as_array().unwrap().len(), 3, "{list}");
    for d in list["devices"].as_array().unwrap() {
        if let Some(l) = d["loop"].as_str() {
            env.held()
                .daemon_loops
                .push((l.to_string(), d["name"].as_str().unwrap().to_string()));
        }
    }
}

/// The original's scripts detach a device that is still mounted, then
/// unmount it. The detach succeeds: tracking stops (no change map, no
/// snapshot of it), the loop device serves the mounted filesystem,
/// untracked, and the device is listed as detaching until its unmount;
/// then the loop device is gone and the device can be attached again.
/// Refused, as by the original, while the device is in a snapshot; a new
/// attach of it meanwhile and a plain stop are refused (EBUSY).
#[test]
fn detach_of_a_mounted_device_keeps_serving_it() {
    const TEST: &str = "detach_of_a_mounted_device_keeps_serving_it";
    let Some(env) = Env::start_if_ready(TEST, &[], None) else {
        return;
    };
    let (dev, dev_loop, origin) = env.ext4_origin();
    let file = env.work.join("origin.img");
    let before = write_files(&origin.join("data"), "before", 4, MIB, 91);
    sync_fs(&origin);

    let storage = env.dir("storage");
    let id = env.snapshot(&dev, &storage);
    env.fails(&["detach", "--device", &dev], &["EBUSY", &id]);
    env.ok(&["snapshot_destroy", "--id", &id]);

    let out = env.cli(&["detach", "--device", &dev]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "detach of a mounted device: {stderr}");
    assert!(
        stderr.contains("warning") && stderr.contains(&dev_loop),
        "{stderr}"
    );
    let list = env.list();
    assert_eq!(list["devices"], serde_json::json!([]), "{list}");
    assert_eq!(
        list["detaching"],
        serde_json::json!([{"name": dev, "path": s(&file), "loop": dev_loop}]),
        "{list}"
    );
    let text = env.ok(&["list"]);
    assert!(
        text.contains(&format!(
            "detaching={dev} path={} loop={dev_loop}\n",
            s(&file)
        )),
        "{text}"
    );
    for args in [
        vec!["cbtinfo", "--device", &dev],
        vec!["readcbtmap", "--device", &dev, "--file", "/dev/null"],
        vec!["cbtinfo", "--device", &dev_loop],
    ] {
        env.fails(&args, &["ENOENT", "detached", "no longer tracked"]);
    }
    env.fails(
        &common::create_args(&dev),
        &["ENOENT", "cannot be in a snapshot", &dev_loop],
    );
    env.fails(
        &["attach", "--device", s(&file), "--loop"],
        &["EBUSY", "still detaching", &dev_loop],
    );
    env.fails(&["shutdown"], &["EBUSY", "detaching", &dev_loop]);
    assert!(running(env.pid));

    // The filesystem goes on, through the loop device, onto the origin.
    let after = write_files(&origin.join("data"), "after", 4, MIB, 92);
    sync_fs(&origin);
    let all = merged(&before, &after);
    verify(&origin.join("data"), &all, "origin while detaching");

    env.umount(&origin);
    assert!(
        wait_until(Duration::from_secs(5), || env
            .list()
            .get("detaching")
            .is_none()),
        "still detaching after the unmount: {}",
        env.list()
    );
    assert_eq!(
        backing_of(&dev_loop),
        None,
        "{dev_loop} left after the unmount"
    );
    assert!(loops_under(&env.fuse_dir).is_empty());

    // The origin file itself holds every write.
    let plain = env.losetup(&file);
    let check = env.mount(&plain, "check", &["-o", "ro"]);
    verify(&check.join("data"), &all, "origin file after the detach");
    env.umount(&check);
    env.losetup_detach(&plain);

    // Attached again: written while untracked, so a new generation.
    let (again, again_loop) = env.attach_loop(&file);
    assert_eq!(again, dev);
    let info = env.ok(&["cbtinfo", "--device", &dev]);
    assert!(
        info.contains("generation_reason=changed-while-detached"),
        "{info}"
    );
    let remounted = env.mount(&again_loop, "origin", &[]);
    verify(&remounted.join("data"), &all, "origin attached again");
}

/// Opens a loop device exclusively, as a mount does, and writes through it.
fn exclusive(device: &str) -> std::fs::File {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        // O_EXCL of Linux (asm-generic/fcntl.h); no libc in these tests.
        .custom_flags(0o200)
        .open(device)
        .unwrap_or_else(|e| panic!("O_EXCL open of {device}: {e}"))
}

/// An exclusive opener of a loop device (what a mount does) stops its
/// release: `shutdown` refuses (EBUSY), a detach leaves the loop device
/// serving the holder (detaching), and a `snapshot_destroy` leaves the
/// image's loop device to its holder, failing its I/O, instead of tearing
/// it away. The check and the release are one step under the daemon's own
/// exclusive open, so a mount cannot come in between.
#[test]
fn exclusive_holder_keeps_its_loop_device() {
    const TEST: &str = "exclusive_holder_keeps_its_loop_device";
    let Some(env) = Env::start_if_ready(TEST, &[], None) else {
        return;
    };
    use std::os::unix::fs::FileExt;
    let file = env.file("a.img", 16 * MIB);
    let (dev, dev_loop) = env.attach_loop(&file);
    let storage = env.dir("storage");
    let id = env.snapshot(&dev, &storage);
    let image = env.image_of(&dev);

    let image_holder = exclusive(&image);
    let direct_read = || {
        Command::new("dd")
            .args([&format!("if={image}"), "of=/dev/null", "bs=4096"])
            .args(["count=1", "skip=1000", "iflag=direct", "status=none"])
            .output()
            .unwrap()
    };
    let read = direct_read();
    assert!(
        read.status.success(),
        "image read before the destroy: {read:?}"
    );
    // The destroy goes on, as the original's does with a mounted image:
    // the loop device stays for its holder, and fails its I/O.
    let out = env.cli(&["snapshot_destroy", "--id", &id]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "destroy with its image held: {stderr}"
    );
    assert!(
        stderr.contains("warning") && stderr.contains(&image) && stderr.contains("in use"),
        "{stderr}"
    );
    assert_eq!(env.list()["snapshots"], serde_json::json!([]));
    assert!(
        backing_of(&image).is_some(),
        "{image} torn away from its holder"
    );
    let read = direct_read();
    assert!(
        !read.status.success(),
        "image read after the destroy: {read:?}"
    );
    drop(image_holder);
    assert!(
        wait_until(Duration::from_secs(5), || backing_of(&image).is_none()),
        "{image} not gone after its holder closed it"
    );
    env.wait_image_loops_gone();

    let holder = exclusive(&dev_loop);
    env.fails(&["shutdown"], &["EBUSY", &dev_loop]);
    assert!(running(env.pid));
    let out = env.cli(&["detach", "--device", &dev]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains(&dev_loop), "{stderr}");
    assert_eq!(env.list()["detaching"][0]["loop"], dev_loop.as_str());
    // Not torn away: the holder still writes, onto the origin.
    let data = vec![0x5au8; 64 * 1024];
    holder.write_all_at(&data, MIB).unwrap();
    holder.sync_all().unwrap();
    let mut on_file = vec![0u8; data.len()];
    std::fs::File::open(&file)
        .unwrap()
        .read_exact_at(&mut on_file, MIB)
        .unwrap();
    assert!(
        on_file == data,
        "a write after the detach missed the origin"
    );
    drop(holder);
    assert!(
        wait_until(Duration::from_secs(5), || backing_of(&dev_loop).is_none()
            && env.list().get("detaching").is_none()),
        "{dev_loop} not gone after its holder closed it: {}",
        env.list()
    );
    let (_, again) = env.attach_loop(&file);
    assert!(again.starts_with("/dev/loop"));
}
