//! A real `blksnapd` in a temporary directory, and the real `blksnap` CLI
//! run against it. The daemon binary is built on first use (same profile),
//! since Cargo only hands a package its own binaries.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub fn target_dir() -> PathBuf {
    // .../target/<profile>/deps/<test binary>
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

pub fn blksnapd() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let status = Command::new(env!("CARGO"))
                .args([
                    "build",
                    "--quiet",
                    "-p",
                    "blksnap-daemon",
                    "--bin",
                    "blksnapd",
                ])
                .status()
                .unwrap();
            assert!(status.success(), "building blksnapd failed");
            let path = target_dir().join("blksnapd");
            assert!(path.exists(), "{} missing", path.display());
            path
        })
        .clone()
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
        let dir = tempfile::tempdir().unwrap();
        let control = dir.path().join("run/control.sock");
        let nbd = dir.path().join("run/nbd.sock");
        let child = blksnapd_command(&control, &dir.path().join("state"))
            .arg("--nbd-socket")
            .arg(&nbd)
            .args(extra)
            .env("BLKSNAP_LOG", "debug")
            .stderr(std::fs::File::create(dir.path().join("daemon.log")).unwrap())
            .spawn()
            .unwrap();
        let daemon = Self {
            dir,
            control,
            nbd,
            child: Some(child),
        };
        daemon.wait_ready();
        daemon
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while UnixStream::connect(&self.control).is_err() {
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
