//! No freeze outlives its take (issue 14, item 3): the freeze deadline
//! (`freeze_timeout_ms`), `shutdown --force` during a take, a daemon killed
//! mid-take (the next start thaws), and each filesystem frozen once
//! whatever its mount points (a bind mount; btrfs, whose superblock has an
//! anonymous device number).
//!
//! A take is made slow for real: one of its devices has its origin on a
//! FUSE file of a second blksnapd, which is then SIGSTOPped, so every I/O
//! to that origin waits until SIGCONT. The freeze of the filesystem on
//! that device waits in the kernel (its superblock write), or, when the
//! device has a write in flight and no filesystem, the engine's take waits
//! for that write. Each test sends SIGCONT in its Drop guard, whatever
//! happened.
//!
//! Needs root, /dev/fuse, /dev/loop-control and the tools in [`TOOLS`]:
//! without them a loud SKIPPED line, and a failure when CI is set. The
//! same safety as `local.rs`: everything mounted or attached is released
//! by [`local_tools::release`] in Drop, after a thaw of every mount.

mod common;
#[path = "common/local_tools.rs"]
mod local_tools;

use std::path::{Path, PathBuf};
use std::process::{Child, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use blksnap_test_support::{is_root, sparse_file};
use common::{wait_until, Daemon};
use local_tools::*;
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// Held by the tests that leave a FUSE mount stuck (its server stopped) or
/// dead (its daemon killed) for a while, and by `mkfs.btrfs`, which stats
/// every mount in the table and fails on such a one (ECONNABORTED) or
/// hangs: tests of one binary run in parallel in one mount namespace.
static MOUNT_TABLE: Mutex<()> = Mutex::new(());

fn mount_table() -> std::sync::MutexGuard<'static, ()> {
    MOUNT_TABLE.lock().unwrap_or_else(PoisonError::into_inner)
}
const COMMAND_TIMEOUT: &str = "60";
const WATCHDOG: Duration = Duration::from_secs(120);
const TOOLS: &[&str] = &[
    "timeout",
    "losetup",
    "mount",
    "umount",
    "mkfs.ext4",
    "fsfreeze",
    "sync",
    "dd",
    "kill",
];

fn ready(test: &str) -> bool {
    let reason = if !is_root() {
        Some("needs root".to_string())
    } else if !Path::new("/dev/fuse").exists() {
        Some("no /dev/fuse".to_string())
    } else if !Path::new("/dev/loop-control").exists() {
        Some("no /dev/loop-control".to_string())
    } else {
        TOOLS
            .iter()
            .find(|t| which(t).is_none())
            .map(|t| format!("{t} not found"))
    };
    let Some(reason) = reason else {
        return true;
    };
    if std::env::var_os("CI").is_some() {
        panic!("{test}: {reason}; CI is set, so the freeze tests must run (as root)");
    }
    loud(&format!(
        "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
         SKIPPED: {test}: {reason}\n\
         !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
    ));
    false
}

/// Whether the filesystem at `mp` is frozen: FIFREEZE of a frozen one fails
/// with EBUSY; one that was not is thawed again at once.
fn is_frozen(mp: &Path) -> bool {
    let out = run("fsfreeze", &["-f", s(mp)]);
    if out.status.success() {
        run_ok("fsfreeze", &["-u", s(mp)]);
        return false;
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("busy"),
        "fsfreeze -f {}: {stderr}",
        mp.display()
    );
    true
}

/// The filesystem at `mp` is not frozen: FITHAW of it fails with EINVAL.
fn assert_thawed(mp: &Path, what: &str) {
    let out = run("fsfreeze", &["-u", s(mp)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("Invalid argument"),
        "{what}: {} was still frozen (fsfreeze -u: {} {stderr})",
        mp.display(),
        out.status
    );
}

/// Writes and fsyncs a file in `dir` on a thread; how long it took, or
/// `None` if it had not finished within `limit` (a frozen filesystem: the
/// thread stays blocked until the thaw in Drop).
fn write_within(dir: &Path, name: &str, limit: Duration) -> Option<Duration> {
    let path = dir.join(name);
    let (sent, done) = std::sync::mpsc::channel();
    let started = Instant::now();
    std::thread::spawn(move || {
        use std::io::Write;
        let result = std::fs::File::create(&path).and_then(|mut f| {
            f.write_all(b"written while the take runs")?;
            f.sync_all()
        });
        let _ = sent.send(result);
    });
    match done.recv_timeout(limit) {
        Ok(result) => {
            result.unwrap_or_else(|e| panic!("writing {name}: {e}"));
            Some(started.elapsed())
        }
        Err(_) => None,
    }
}

fn parse_json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("bad JSON {text:?}: {e}"))
}

/// A second blksnapd whose FUSE file is an origin of the first: stopped
/// (SIGSTOP), it makes every I/O to that origin wait.
struct Slow {
    daemon: Daemon,
    fuse_dir: PathBuf,
    /// The FUSE file, an origin for the daemon under test.
    file: PathBuf,
}

impl Slow {
    fn stop(&self) {
        common::signal(self.daemon.pid(), "STOP");
    }

    fn resume(&self) {
        common::signal(self.daemon.pid(), "CONT");
    }
}

struct Env {
    test: &'static str,
    work: PathBuf,
    fuse_dir: PathBuf,
    args: Vec<String>,
    control: PathBuf,
    pid: u32,
    held: Arc<Mutex<Held>>,
    children: Mutex<Vec<Child>>,
    done: Arc<AtomicBool>,
    started: Instant,
    daemon: Option<Daemon>,
    slow: Option<Slow>,
    _tmp: tempfile::TempDir,
}

impl Env {
    fn start(test: &'static str, config: &str) -> Option<Self> {
        if !ready(test) {
            return None;
        }
        let tmp = tempfile::Builder::new()
            .prefix("blksnap-freeze-")
            .tempdir()
            .unwrap();
        let work = tmp.path().canonicalize().unwrap();
        let fuse_dir = work.join("dev");
        let config_file = work.join("blksnapd.toml");
        std::fs::write(&config_file, config).unwrap();
        let args = vec![
            "--fuse-dir".to_string(),
            s(&fuse_dir).to_string(),
            "--config".to_string(),
            s(&config_file).to_string(),
        ];
        let daemon = Daemon::start_with(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let held = Arc::new(Mutex::new(Held::default()));
        let done = Arc::new(AtomicBool::new(false));
        {
            let (held, done, fuse_dir) = (held.clone(), done.clone(), fuse_dir.clone());
            std::thread::spawn(move || watchdog(test, held, done, fuse_dir));
        }
        Some(Self {
            test,
            control: daemon.control.clone(),
            pid: daemon.pid(),
            work,
            fuse_dir,
            args,
            held,
            children: Mutex::new(Vec::new()),
            done,
            started: Instant::now(),
            daemon: Some(daemon),
            slow: None,
            _tmp: tmp,
        })
    }

    fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().unwrap()
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn log(&self) -> String {
        self.daemon()
            .log()
            .lines()
            .filter(|l| !l.contains("fuser::request"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn wait_log(&self, needle: &str, limit: Duration) {
        assert!(
            wait_until(limit, || self.log().contains(needle)),
            "no {needle:?} in the log within {limit:?}:\n{}",
            self.log()
        );
    }

    fn cli_command(&self, args: &[&str]) -> std::process::Command {
        let mut c = command(env!("CARGO_BIN_EXE_blksnap"));
        c.args(args)
            .env("BLKSNAP_CONTROL", &self.control)
            .current_dir("/");
        c
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cli_command(args).output().unwrap();
        assert!(
            out.status.success(),
            "blksnap {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Starts `blksnap` in the background; stopped in Drop if still running.
    fn spawn_cli(&self, args: &[&str]) -> u32 {
        let child = self
            .cli_command(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        self.children.lock().unwrap().push(child);
        pid
    }

    /// The output of a background command, once it ended (within `limit`).
    fn wait_child(&self, pid: u32, limit: Duration) -> Output {
        assert!(
            wait_until(limit, || {
                let mut children = self.children.lock().unwrap();
                let child = children.iter_mut().find(|c| c.id() == pid).unwrap();
                matches!(child.try_wait(), Ok(Some(_)))
            }),
            "background process {pid} still runs after {limit:?}:\n{}",
            self.log()
        );
        let mut children = self.children.lock().unwrap();
        let i = children.iter().position(|c| c.id() == pid).unwrap();
        children.remove(i).wait_with_output().unwrap()
    }

    fn child_running(&self, pid: u32) -> bool {
        let mut children = self.children.lock().unwrap();
        let child = children.iter_mut().find(|c| c.id() == pid).unwrap();
        matches!(child.try_wait(), Ok(None))
    }

    /// `attach --loop` of `file` (named `name`): the loop device.
    fn attach_loop(&self, file: &Path, name: &str) -> String {
        let out = self.ok(&["attach", "--device", s(file), "--name", name, "--loop"]);
        let device = out
            .lines()
            .find_map(|l| l.strip_prefix("loop="))
            .unwrap_or_else(|| panic!("no loop= in {out:?}"))
            .to_string();
        self.held()
            .daemon_loops
            .push((device.clone(), name.to_string()));
        device
    }

    fn mount(&self, args: &[&str], name: &str) -> PathBuf {
        let mount_point = self.work.join(name);
        std::fs::create_dir_all(&mount_point).unwrap();
        self.held().mounts.push(mount_point.clone());
        let mut all = args.to_vec();
        all.push(s(&mount_point));
        run_ok("mount", &all);
        mount_point
    }

    /// A device `name` with ext4 on its loop device, mounted on
    /// `<work>/<name>`, its writes synced: (loop device, mount point).
    fn ext4(&self, file: &Path, name: &str) -> (String, PathBuf) {
        let device = self.attach_loop(file, name);
        run_ok(
            "mkfs.ext4",
            &[
                "-q",
                "-F",
                "-E",
                "lazy_itable_init=0,lazy_journal_init=0",
                &device,
            ],
        );
        let mp = self.mount(&[&device], name);
        run_ok("sync", &["-f", s(&mp)]);
        (device, mp)
    }

    /// A second daemon serving `slow.img` as a FUSE file.
    fn start_slow(&mut self) {
        let fuse_dir = self.work.join("slow-dev");
        let daemon = Daemon::start_with(&["--fuse-dir", s(&fuse_dir)]);
        let image = sparse_file(&self.work, "slow.img", 32 * MIB);
        let out = daemon.cli(&["attach", "--device", s(&image), "--no-loop"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let file = fuse_dir.join("slow.img");
        assert!(file.exists(), "{} missing", file.display());
        self.slow = Some(Slow {
            daemon,
            fuse_dir,
            file,
        });
    }

    fn slow(&self) -> &Slow {
        self.slow.as_ref().unwrap()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(slow) = &self.slow {
            slow.resume();
        }
        let children: Vec<Child> = self
            .children
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain(..)
            .collect();
        for mut child in children {
            let _ = child.kill();
            let _ = child.wait();
        }
        let held = std::mem::take(&mut *self.held());
        for m in &held.mounts {
            let _ = try_run("fsfreeze", &["-u", s(m)]);
        }
        release(
            self.test,
            held,
            &self.fuse_dir,
            &self.work,
            &self.control,
            self.pid,
            self.daemon.take(),
        );
        if let Some(mut slow) = self.slow.take() {
            let pid = slow.daemon.pid();
            common::signal(pid, "TERM");
            if !wait_until(Duration::from_secs(20), || !running(pid)) {
                abort_fuse(&slow.fuse_dir);
            }
            let _ = slow.daemon.stop_or_status();
            if is_mounted(&slow.fuse_dir) {
                abort_fuse(&slow.fuse_dir);
            }
        }
        self.done.store(true, Ordering::SeqCst);
        eprintln!("{}: {:.1?}", self.test, self.started.elapsed());
    }
}

/// Two devices with ext4, the second's origin on the slow daemon's FUSE
/// file; a snapshot of both (the fast one first, so it is frozen first).
/// Returns (fast mount point, slow mount point, snapshot id).
fn fast_and_slow(env: &mut Env) -> (PathBuf, PathBuf, String) {
    env.start_slow();
    let (_, fast) = env.ext4(&sparse_file(&env.work, "fast.img", 32 * MIB), "fast");
    let slow_file = env.slow().file.clone();
    let (_, slow) = env.ext4(&slow_file, "slow");
    let storage = env.work.join("storage");
    std::fs::create_dir_all(&storage).unwrap();
    let id = env
        .ok(&[
            "snapshot_create",
            "--device",
            "fast",
            "--device",
            "slow",
            "--file",
            s(&storage),
            "--limit",
            "256M",
        ])
        .trim()
        .to_string();
    (fast, slow, id)
}

/// `shutdown --force` while a take waits for the freeze of a filesystem on
/// slow storage: the filesystem the take had frozen is thawed at once (a
/// write to it completes while the storage is still stuck), the daemon
/// does not exit while its own freeze is still in the kernel (that would
/// hang the filesystem for good), and exits, status 0, soon after the
/// storage answers, with nothing frozen.
#[test]
fn shutdown_force_during_a_stuck_take_thaws_first() {
    const TEST: &str = "shutdown_force_during_a_stuck_take_thaws_first";
    let _mounts = mount_table();
    let Some(mut env) = Env::start(TEST, "freeze_timeout_ms = 60000\n") else {
        return;
    };
    let (fast, slow, id) = fast_and_slow(&mut env);
    env.slow().stop();
    let take = env.spawn_cli(&["snapshot_take", "--id", &id, "--json"]);
    env.wait_log(
        &format!("filesystem frozen for the take mount={}", fast.display()),
        Duration::from_secs(10),
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        env.child_running(take),
        "the take did not wait for the slow storage"
    );
    assert!(
        is_frozen(&fast),
        "the take had not frozen {}",
        fast.display()
    );

    let asked = Instant::now();
    env.ok(&["shutdown", "--force"]);
    let took = write_within(&fast, "after-shutdown", Duration::from_secs(5));
    let took = took.unwrap_or_else(|| {
        panic!(
            "{} still frozen 5 s after shutdown --force:\n{}",
            fast.display(),
            env.log()
        )
    });
    eprintln!("{TEST}: a write to the frozen filesystem completed {:.0?} after shutdown --force ({took:.0?} for the write)", asked.elapsed());
    assert!(
        env.log()
            .contains("stopping: thawing the filesystems frozen for a take"),
        "{}",
        env.log()
    );
    // Its own FIFREEZE of the slow filesystem is still in the kernel.
    std::thread::sleep(Duration::from_secs(1));
    assert!(running(env.pid), "blksnapd exited with a freeze in flight");

    let resumed = Instant::now();
    env.slow().resume();
    assert!(
        wait_until(Duration::from_secs(15), || !running(env.pid)),
        "blksnapd did not exit within 15 s of the storage answering:\n{}",
        env.log()
    );
    eprintln!(
        "{TEST}: blksnapd exited {:.1?} after the storage answered",
        resumed.elapsed()
    );
    let status = env.daemon.as_mut().unwrap().stop_or_status();
    assert_eq!(status.code(), Some(0), "{}", env.log());
    assert_thawed(&fast, "after the stop");
    assert_thawed(&slow, "after the stop");
    let log = env.log();
    assert!(log.contains("blksnapd stopped"), "{log}");
    // The take's reply, if it got one, says neither stayed frozen.
    let out = env.wait_child(take, Duration::from_secs(5));
    if out.status.success() {
        let taken = parse_json(&String::from_utf8_lossy(&out.stdout));
        assert_eq!(taken["frozen"], serde_json::json!([]), "{taken}");
        let warnings = taken["warnings"].to_string();
        assert!(warnings.contains("the daemon is stopping"), "{taken}");
    }
}

/// The freeze deadline: a take still stuck after `freeze_timeout_ms`
/// thaws at the deadline (writes to the filesystem proceed while the take
/// waits), and its result lists nothing as frozen and warns that the
/// images may be crash-consistent only.
#[test]
fn freeze_deadline_thaws_while_the_take_is_stuck() {
    const TEST: &str = "freeze_deadline_thaws_while_the_take_is_stuck";
    let _mounts = mount_table();
    let Some(mut env) = Env::start(TEST, "freeze_timeout_ms = 1000\n") else {
        return;
    };
    let (fast, slow, id) = fast_and_slow(&mut env);
    env.slow().stop();
    let started = Instant::now();
    let take = env.spawn_cli(&["snapshot_take", "--id", &id, "--json"]);
    env.wait_log(
        &format!("filesystem frozen for the take mount={}", fast.display()),
        Duration::from_secs(10),
    );
    assert!(
        is_frozen(&fast),
        "the take had not frozen {}",
        fast.display()
    );
    env.wait_log("freeze deadline passed", Duration::from_secs(5));
    let deadline_at = started.elapsed();
    let took = write_within(&fast, "after-deadline", Duration::from_secs(5)).unwrap_or_else(|| {
        panic!(
            "{} still frozen after the deadline:\n{}",
            fast.display(),
            env.log()
        )
    });
    assert!(
        env.child_running(take),
        "the take was not stuck any more: the test proves nothing"
    );
    eprintln!("{TEST}: deadline reached {deadline_at:.1?} after the take began; a write then took {took:.0?}");
    assert!(
        deadline_at >= Duration::from_millis(900),
        "thawed before the deadline: {deadline_at:?}"
    );

    env.slow().resume();
    let out = env.wait_child(take, Duration::from_secs(20));
    assert!(
        out.status.success(),
        "the take failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        env.log()
    );
    let taken = parse_json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(taken["frozen"], serde_json::json!([]), "{taken}");
    let warnings: Vec<String> = taken["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_str().unwrap().to_string())
        .collect();
    for mp in [&fast, &slow] {
        let w = warnings
            .iter()
            .find(|w| w.contains(&format!("the filesystem at {} ", mp.display())))
            .unwrap_or_else(|| panic!("no warning for {}: {warnings:?}", mp.display()));
        assert!(
            w.contains("freeze_timeout_ms = 1000") && w.contains("crash-consistent only"),
            "{w}"
        );
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("blksnap: warning: the filesystem at"),
        "{stderr}"
    );
    assert_thawed(&fast, "after the take");
    assert_thawed(&slow, "after the take");
    let info = parse_json(&env.ok(&["snapshot_info", "--device", "fast", "--json"]));
    assert_eq!(info["taken"], true, "{info}");
}

/// A daemon SIGKILLed during a take leaves the filesystem it froze frozen;
/// the next start over the same FUSE directory thaws it, first thing.
#[test]
fn a_freeze_left_by_a_killed_daemon_is_thawed_at_start() {
    const TEST: &str = "a_freeze_left_by_a_killed_daemon_is_thawed_at_start";
    let _mounts = mount_table();
    let Some(mut env) = Env::start(TEST, "freeze_timeout_ms = 60000\n") else {
        return;
    };
    env.start_slow();
    let (_, fast) = env.ext4(&sparse_file(&env.work, "fast.img", 32 * MIB), "fast");
    // No filesystem on the slow device: a write in flight on it makes the
    // engine's take wait (in user space, so SIGKILL ends the daemon).
    let slow_file = env.slow().file.clone();
    env.ok(&[
        "attach",
        "--device",
        s(&slow_file),
        "--name",
        "slow",
        "--no-loop",
    ]);
    let storage = env.work.join("storage");
    std::fs::create_dir_all(&storage).unwrap();
    let id = env
        .ok(&[
            "snapshot_create",
            "--device",
            "fast",
            "--device",
            "slow",
            "--file",
            s(&storage),
            "--limit",
            "256M",
        ])
        .trim()
        .to_string();
    env.slow().stop();
    let fuse_slow = env.fuse_dir.join("slow");
    let ino = {
        use std::os::unix::fs::MetadataExt;
        format!(
            "ino {:#018x} WRITE",
            std::fs::metadata(&fuse_slow).unwrap().ino()
        )
    };
    let writer = command("dd")
        .args([
            "if=/dev/zero",
            &format!("of={}", s(&fuse_slow)),
            "bs=4096",
            "count=1",
            "oflag=direct",
            "conv=notrunc",
        ])
        .spawn()
        .unwrap();
    env.children.lock().unwrap().push(writer);
    assert!(
        wait_until(Duration::from_secs(5), || env.daemon().log().contains(&ino)),
        "the write never reached blksnapd:\n{}",
        env.daemon().log()
    );
    let take = env.spawn_cli(&["snapshot_take", "--id", &id]);
    env.wait_log(
        &format!("filesystem frozen for the take mount={}", fast.display()),
        Duration::from_secs(10),
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        env.child_running(take),
        "the take did not wait for the write in flight"
    );
    assert!(
        is_frozen(&fast),
        "the take had not frozen {}",
        fast.display()
    );

    let first_run = env.daemon().log().len();
    // The killed daemon's exit closes the slow origin, which asks the slow
    // daemon (a FUSE flush): it ends once that one runs again.
    common::signal(env.pid, "KILL");
    env.slow().resume();
    env.kill_and_restart_after(|_| {
        // The crash left it frozen: nothing but the next start thaws it.
        assert!(
            is_frozen(&fast),
            "{} thawed without a restart",
            fast.display()
        );
    });
    assert_thawed(&fast, "after the restart");
    let log = env.daemon().log()[first_run..].to_string();
    let thawed = log
        .lines()
        .find(|l| l.contains("thawed a filesystem left frozen"))
        .unwrap_or_else(|| panic!("no thaw at start in the log:\n{log}"));
    assert!(thawed.contains(s(&fast)), "{thawed}");
    let thaw_at = log.find("thawed a filesystem left frozen").unwrap();
    let mounted_at = log.find("FUSE volumes mounted").unwrap_or(usize::MAX);
    assert!(
        thaw_at < mounted_at,
        "the thaw came after the FUSE mount:\n{log}"
    );
}

impl Env {
    /// SIGKILL, `between` (the daemon gone), then a start over the same
    /// directory.
    fn kill_and_restart_after(&mut self, between: impl FnOnce(&Env)) {
        let dir = self.daemon.as_mut().unwrap().kill();
        between(self);
        let daemon = Daemon::start_in(
            dir,
            &self.args.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        self.pid = daemon.pid();
        self.daemon = Some(daemon);
    }
}

/// A filesystem mounted twice (a bind mount) is frozen once, the take
/// succeeds without a warning; so does a btrfs mounted twice (its top and
/// a subvolume), whose superblock has an anonymous device number, when
/// mkfs.btrfs is here.
#[test]
fn each_filesystem_is_frozen_once_bind_mounts_and_btrfs() {
    const TEST: &str = "each_filesystem_is_frozen_once_bind_mounts_and_btrfs";
    let Some(env) = Env::start(TEST, "") else {
        return;
    };
    let (_, a) = env.ext4(&sparse_file(&env.work, "a.img", 32 * MIB), "a");
    let bind = env.mount(&["--bind", s(&a)], "a-bind");
    let storage = env.work.join("storage");
    std::fs::create_dir_all(&storage).unwrap();
    let create = |device: &str| {
        env.ok(&[
            "snapshot_create",
            "--device",
            device,
            "--file",
            s(&storage),
            "--limit",
            "256M",
        ])
        .trim()
        .to_string()
    };
    let id = create("a");
    let taken = parse_json(&env.ok(&["snapshot_take", "--id", &id, "--json"]));
    assert_eq!(
        taken,
        serde_json::json!({"frozen": [s(&a)], "warnings": []}),
        "bind mount {}: {taken}",
        bind.display()
    );
    assert_eq!(
        env.log().matches("filesystem frozen for the take").count(),
        1
    );
    env.ok(&["snapshot_destroy", "--id", &id]);

    let btrfs_here = which("mkfs.btrfs").is_some()
        && which("btrfs").is_some()
        && std::fs::read_to_string("/proc/filesystems")
            .unwrap_or_default()
            .contains("btrfs");
    if !btrfs_here {
        let message =
            format!("{TEST}: btrfs part SKIPPED: no mkfs.btrfs, btrfs tool or btrfs in the kernel");
        loud(&message);
        return;
    }
    let device = env.attach_loop(&sparse_file(&env.work, "b.img", 160 * MIB), "b");
    {
        let _mounts = mount_table();
        run_ok("mkfs.btrfs", &["-q", "-f", &device]);
    }
    let top = env.mount(&[&device], "b");
    run_ok("btrfs", &["subvolume", "create", s(&top.join("sub"))]);
    let sub = env.mount(&["-o", "subvol=sub", &device], "b-sub");
    run_ok("sync", &["-f", s(&top)]);
    let id = create("b");
    let taken = parse_json(&env.ok(&["snapshot_take", "--id", &id, "--json"]));
    assert_eq!(taken["warnings"], serde_json::json!([]), "{taken}");
    assert_eq!(
        taken["frozen"],
        serde_json::json!([s(&top)]),
        "btrfs at {} and {}: {taken}",
        top.display(),
        sub.display()
    );
    assert_thawed(&top, "after the take");
    std::fs::write(sub.join("after"), b"thawed").unwrap();
    env.ok(&["snapshot_destroy", "--id", &id]);
}
