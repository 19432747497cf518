//! A real `blksnapd` in a temporary directory, and the real `blksnap` CLI
//! run against it. `blksnap` is this package's own binary
//! (`CARGO_BIN_EXE_blksnap`, built by Cargo with the profile under test);
//! `blksnapd` is another package's, which Cargo does not hand over, so
//! [`blksnapd`] builds it with the same profile, target and target
//! directory as this test executable, and runs it from there.

#![allow(dead_code)]

pub mod nbd_tools;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// `<target dir>[/<triple>]/<profile dir>`: this test executable runs from
/// its `deps/`.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap();
    assert_eq!(
        deps.file_name().and_then(|n| n.to_str()),
        Some("deps"),
        "test executable outside <target>/<profile>/deps: {}",
        exe.display()
    );
    deps.parent().unwrap().to_path_buf()
}

/// `cargo build` with the profile, target triple and target directory this
/// test executable was built with (read off [`target_dir`]): `debug` is the
/// `dev` profile, any other directory is named after its profile; a target
/// directory root holds Cargo's `CACHEDIR.TAG`, a `<triple>` directory
/// under it does not.
pub fn cargo_build_same_profile() -> Command {
    let profile_dir = target_dir();
    let name = profile_dir.file_name().unwrap().to_str().unwrap();
    let profile = if name == "debug" { "dev" } else { name };
    let parent = profile_dir.parent().unwrap();
    let mut command = Command::new(env!("CARGO"));
    command.args(["build", "--quiet", "--profile", profile]);
    if parent.join("CACHEDIR.TAG").exists() {
        command.arg("--target-dir").arg(parent);
    } else {
        let triple = parent.file_name().unwrap();
        command
            .arg("--target")
            .arg(triple)
            .arg("--target-dir")
            .arg(parent.parent().unwrap());
    }
    command.current_dir(env!("CARGO_MANIFEST_DIR"));
    // Cargo sets these for the test, not for the `cargo test` that built
    // the test; ring's build script tracks some (CARGO_PKG_NAME,
    // CARGO_MANIFEST_DIR): with them, each run would rebuild ring, rustls
    // and everything above them, twice.
    for (var, _) in std::env::vars_os() {
        let var = var.to_string_lossy();
        let per_package = ["CARGO_PKG_", "CARGO_MANIFEST_", "CARGO_BIN_"];
        if per_package.iter().any(|p| var.starts_with(p))
            || [
                "CARGO_CRATE_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
            ]
            .contains(&var.as_ref())
        {
            command.env_remove(var.as_ref());
        }
    }
    command
}

/// The `blksnapd` of the profile under test. Built (once per test
/// executable) with [`cargo_build_same_profile`] even when a binary is
/// there already: Cargo rebuilds only what changed, and a stale daemon
/// from an earlier build would otherwise be tested.
pub fn blksnapd() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let status = cargo_build_same_profile()
                .args(["-p", "blksnap-daemon", "--bin", "blksnapd"])
                .status()
                .unwrap();
            assert!(status.success(), "building blksnapd failed");
            let path = target_dir().join("blksnapd");
            assert!(path.exists(), "{} missing", path.display());
            path
        })
        .clone()
}

/// The `blksnap` CLI of the profile under test (built by Cargo for this
/// package's tests).
/// A loopback TCP port free a moment ago, for a daemon to listen on.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn blksnap() -> &'static str {
    env!("CARGO_BIN_EXE_blksnap")
}

/// Polls `done` every 20 ms until it holds; false after `limit`.
pub fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `blksnapd` with its control socket and state directory where given.
pub fn blksnapd_command(control: &Path, state_dir: &Path) -> Command {
    let mut command = Command::new(blksnapd());
    command
        .arg("--control")
        .arg(control)
        .arg("--state-dir")
        .arg(state_dir);
    command
}

/// The arguments of a `snapshot_create` of `device` with its difference
/// storage in the current directory (`--file .`, the daemon's directory
/// for [`Daemon::cli`]) and a limit of 1 GiB.
pub fn create_args(device: &str) -> [&str; 7] {
    [
        "snapshot_create",
        "--device",
        device,
        "--file",
        ".",
        "--limit",
        "1G",
    ]
}

pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub control: PathBuf,
    pub nbd: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    pub fn start_with(extra: &[&str]) -> Self {
        Self::start_in(tempfile::tempdir().unwrap(), extra)
    }

    /// A daemon in `dir` (sockets under `run/`, state in `state/`, log in
    /// `daemon.log`, appended to): a directory from [`Self::kill`] starts
    /// a daemon over what the killed one left behind.
    pub fn start_in(dir: tempfile::TempDir, extra: &[&str]) -> Self {
        let control = dir.path().join("run/control.sock");
        let nbd = dir.path().join("run/nbd.sock");
        let child = blksnapd_command(&control, &dir.path().join("state"))
            .arg("--nbd-socket")
            .arg(&nbd)
            .args(extra)
            .env("BLKSNAP_LOG", "debug")
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.path().join("daemon.log"))
                    .unwrap(),
            )
            .spawn()
            .unwrap();
        let mut daemon = Self {
            dir,
            control,
            nbd,
            child: Some(child),
        };
        daemon.wait_ready();
        daemon
    }

    /// Ready when the control socket answers (created last, after every
    /// frontend); a daemon that exits meanwhile fails at once.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&self.control).is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("blksnapd exited at start ({status}): {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "blksnapd did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The NBD URI of an export.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.nbd.display())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// The log's lines that have every needle.
    pub fn log_lines(&self, needles: &[&str]) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .map(str::to_string)
            .collect()
    }

    /// Waits (bounded, 20 s) until the log has a line with every needle;
    /// returns that line.
    pub fn wait_log(&self, needles: &[&str]) -> String {
        self.wait_log_after(needles, 0)
    }

    /// Waits (bounded, 20 s) until the log has more than `before` lines
    /// with every needle (`before` from [`Self::log_lines`], taken before
    /// the action); returns the first new one.
    pub fn wait_log_after(&self, needles: &[&str], before: usize) -> String {
        let mut found = None;
        let seen = wait_until(Duration::from_secs(20), || {
            found = self.log_lines(needles).into_iter().nth(before);
            found.is_some()
        });
        assert!(seen, "no new log line with {needles:?}:\n{}", self.log());
        found.unwrap()
    }

    /// Whether the daemon process still runs (reaps it if it stopped).
    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// An image file of `size` bytes in the daemon's directory.
    pub fn image(&self, name: &str, size: u64) -> PathBuf {
        blksnap_test_support::sparse_file(self.dir.path(), name, size)
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_blksnap"))
            .args(args)
            .env("BLKSNAP_CONTROL", &self.control)
            .current_dir(self.dir.path())
            .output()
            .unwrap()
    }

    /// Runs the CLI, asserts success, returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "blksnap {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs the CLI, asserts it fails with status 1 and a one-line message
    /// containing every `needle`; returns the message.
    pub fn fails(&self, args: &[&str], needles: &[&str]) -> String {
        let out = self.cli(args);
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(1), "blksnap {args:?}: {stderr}");
        assert_eq!(
            stderr.lines().count(),
            1,
            "one-line error expected: {stderr}"
        );
        assert!(stderr.starts_with("blksnap: "), "{stderr}");
        for n in needles {
            assert!(
                stderr.contains(n),
                "blksnap {args:?}: {stderr:?} lacks {n:?}"
            );
        }
        assert!(out.stdout.is_empty());
        stderr
    }

    /// Creates a snapshot of `device` (see [`create_args`]); returns its id.
    pub fn create(&self, device: &str) -> String {
        self.ok(&create_args(device)).trim().to_string()
    }

    /// Creates and takes a snapshot of `device`; returns its id.
    pub fn snapshot(&self, device: &str) -> String {
        let id = self.create(device);
        self.ok(&["snapshot_take", "--id", &id]);
        id
    }

    /// Sends raw lines on a fresh control connection; returns reply lines.
    pub fn raw(&self, payload: &[u8], replies: usize) -> Vec<serde_json::Value> {
        let mut stream = UnixStream::connect(&self.control).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.write_all(payload).unwrap();
        let mut reader = BufReader::new(stream);
        (0..replies)
            .map(|_| {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad reply {line:?}: {e}"))
            })
            .collect()
    }

    /// SIGKILL (no clean stop at all), waits for the exit and hands over
    /// the daemon's directory, with what it left behind.
    pub fn kill(&mut self) -> tempfile::TempDir {
        let mut child = self.child.take().expect("running");
        child.kill().unwrap();
        child.wait().unwrap();
        std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap())
    }

    /// The lock file beside the control socket.
    pub fn lock_file(&self) -> PathBuf {
        PathBuf::from(format!("{}.lock", self.control.display()))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGTERM, then the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        signal(self.pid(), "TERM");
        self.stop_or_status()
    }

    /// The exit status, once the daemon has stopped (asked already).
    pub fn stop_or_status(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "blksnapd did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

pub fn signal(pid: u32, name: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(ok.success());
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn exists(path: &Path) -> bool {
    path.symlink_metadata().is_ok()
}

// ---------------------------------------------------------------------------
// Restarts over the same directory (persistence tests).

impl Daemon {
    /// The daemon's directory, handed over once the daemon has stopped
    /// (by [`Self::stop`] or [`Self::stop_or_status`]), for
    /// [`Self::start_in`].
    pub fn take_dir(&mut self) -> tempfile::TempDir {
        assert!(self.child.is_none(), "take_dir of a running daemon");
        std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap())
    }

    /// Clean stop by SIGTERM (exit status 0 asserted); hands over the
    /// directory.
    pub fn stop_keep_dir(&mut self) -> tempfile::TempDir {
        let status = self.stop();
        assert!(status.success(), "blksnapd: {status}\n{}", self.log());
        self.take_dir()
    }

    /// Clean stop by `blksnap shutdown` (exit status 0 asserted); hands
    /// over the directory.
    pub fn shutdown_keep_dir(&mut self) -> tempfile::TempDir {
        self.ok(&["shutdown"]);
        let status = self.stop_or_status();
        assert!(status.success(), "blksnapd: {status}\n{}", self.log());
        self.take_dir()
    }

    /// The `key=value` lines of a successful CLI command, as a map.
    pub fn ok_fields(&self, args: &[&str]) -> std::collections::BTreeMap<String, String> {
        self.ok(args)
            .lines()
            .map(|l| {
                let (k, v) = l
                    .split_once('=')
                    .unwrap_or_else(|| panic!("blksnap {args:?}: not key=value: {l:?}"));
                (k.to_string(), v.to_string())
            })
            .collect()
    }

    /// `blksnap readcbtmap --device D`: the readable change map.
    pub fn cbt_map(&self, device: &str) -> Vec<u8> {
        let file = self.path("readcbtmap.out");
        let _ = std::fs::remove_file(&file);
        self.ok(&[
            "readcbtmap",
            "--device",
            device,
            "--file",
            file.to_str().unwrap(),
        ]);
        let map = std::fs::read(&file).unwrap();
        std::fs::remove_file(&file).unwrap();
        map
    }
}

/// The `blksnap-backup` of the profile under test, built like [`blksnapd`].
pub fn blksnap_backup() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let status = cargo_build_same_profile()
                .args(["-p", "blksnap-backup", "--bin", "blksnap-backup"])
                .status()
                .unwrap();
            assert!(status.success(), "building blksnap-backup failed");
            let path = target_dir().join("blksnap-backup");
            assert!(path.exists(), "{} missing", path.display());
            path
        })
        .clone()
}

/// `snapshot_waitevent`'s output checked against the original's layout
/// (`result=timeout` alone, or `result=ok`, then `time=` with a number,
/// then `event=`); returns the lines from `event=` on, or `["event=none"]`
/// for a timeout.
pub fn event_lines(out: &str) -> Vec<String> {
    let lines: Vec<&str> = out.lines().collect();
    if lines == ["result=timeout"] {
        return vec!["event=none".to_string()];
    }
    assert_eq!(lines.first(), Some(&"result=ok"), "{out:?}");
    let time = lines.get(1).and_then(|l| l.strip_prefix("time="));
    assert!(
        time.is_some_and(|t| t.parse::<u64>().is_ok()),
        "no time=N second: {out:?}"
    );
    assert!(
        lines.get(2).is_some_and(|l| l.starts_with("event=")),
        "no event= third: {out:?}"
    );
    lines[2..].iter().map(|l| l.to_string()).collect()
}
