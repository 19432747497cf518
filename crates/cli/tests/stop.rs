//! Issue 12, "SIGTERM must always stop the daemon": a real `blksnapd` whose
//! socket files were removed under it (a tmpfiles cleanup, a careless
//! `rm -rf` of its run directory) still stops on SIGTERM, within a bound,
//! with status 0, and unmounts its FUSE directory. The stop must not reach
//! the daemon's accept loops through any path in the file system, and must
//! not remove files it did not create (a daemon started since may own them).
//!
//! Its own small daemon harness (a TCP listener and a FUSE directory as
//! well, and a bounded wait), with the daemon binary from `common` (the
//! profile under test): everything lives in the test's temporary
//! directory. The FUSE
//! test needs root and /dev/fuse; without them it prints a loud
//! `SKIPPED: <test>: <reason>` line and passes, unless the environment
//! variable CI is set: then it fails, as the local-device tests do.

mod common;

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use blksnap_test_support::is_root;
use common::blksnapd;

/// How long a daemon may take to stop after SIGTERM. A clean stop with no
/// clients takes milliseconds; the daemon's own drain bounds are 10 s, and
/// nothing here is in flight, so anything near this is the bug.
const STOP_BOUND: Duration = Duration::from_secs(10);

/// A `blksnapd` with everything (sockets, state, log, FUSE directory) in
/// its own temporary directory. Drop kills a daemon that did not stop and
/// lazily unmounts a FUSE directory it left behind.
struct Daemon {
    dir: tempfile::TempDir,
    run: PathBuf,
    control: PathBuf,
    nbd: PathBuf,
    fuse: Option<PathBuf>,
    child: Option<Child>,
}

impl Daemon {
    fn start(fuse: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        // Canonical, so it compares with the mount points of mountinfo.
        let root = dir.path().canonicalize().unwrap();
        let run = root.join("run");
        let control = run.join("control.sock");
        let nbd = run.join("nbd.sock");
        let fuse = fuse.then(|| root.join("volumes"));
        let mut command = Command::new(blksnapd());
        command
            .arg("--control")
            .arg(&control)
            .arg("--state-dir")
            .arg(root.join("state"))
            .arg("--nbd-socket")
            .arg(&nbd)
            // A TCP listener too: its accept loop must stop as well.
            .args(["--nbd-tcp", "127.0.0.1:0"])
            .env("BLKSNAP_LOG", "debug")
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(root.join("daemon.log")).unwrap());
        if let Some(fuse) = &fuse {
            command.arg("--fuse-dir").arg(fuse);
        }
        let mut daemon = Self {
            dir,
            run,
            control,
            nbd,
            fuse,
            child: Some(command.spawn().unwrap()),
        };
        daemon.wait_ready();
        daemon
    }

    /// Ready when the control socket answers: it is created last, after
    /// every frontend (NBD, FUSE) is up.
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

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// Removes both socket files, as a cleanup of the run directory would.
    fn remove_sockets(&self) {
        std::fs::remove_file(&self.control).unwrap();
        std::fs::remove_file(&self.nbd).unwrap();
    }

    fn sigterm(&self) {
        let ok = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.as_ref().unwrap().id().to_string())
            .status()
            .unwrap();
        assert!(ok.success(), "kill -TERM failed");
    }

    /// The exit status, which must come within [`STOP_BOUND`].
    fn wait_exit(&mut self) -> ExitStatus {
        let child = self.child.as_mut().expect("running");
        let deadline = Instant::now() + STOP_BOUND;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "blksnapd did not exit within {STOP_BOUND:?} of SIGTERM; its log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then asserts a clean stop: status 0 within the bound, and
    /// the stop in the log.
    fn stop_cleanly(&mut self) {
        self.sigterm();
        let status = self.wait_exit();
        let log = self.log();
        assert!(status.success(), "blksnapd exited with {status}: {log}");
        assert!(log.contains("stopping"), "no stop logged: {log}");
        assert!(log.contains("blksnapd stopped"), "no clean end: {log}");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // A killed daemon leaves a dead FUSE mount that would keep the
        // temporary directory from being removed.
        if let Some(fuse) = &self.fuse {
            if is_mount_point(fuse) {
                let _ = Command::new("umount")
                    .arg("-l")
                    .arg(fuse)
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

/// Whether `path` (canonical) is a mount point, from mountinfo: its fifth
/// field, with space, tab, newline and backslash written as octal escapes.
fn is_mount_point(path: &Path) -> bool {
    let wanted = path.to_str().expect("UTF-8 path");
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .any(|field| unescape_mountinfo(field) == wanted)
}

fn unescape_mountinfo(field: &str) -> String {
    let mut out = Vec::with_capacity(field.len());
    let bytes = field.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match octal {
            Some(digits) => {
                out.push(digits.iter().fold(0u8, |n, d| n * 8 + (d - b'0')));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether the FUSE test can run here; prints a loud SKIPPED line when it
/// cannot (and fails when CI is set: there it must run).
fn fuse_ready(test: &str) -> bool {
    let reason = if !is_root() {
        "needs root"
    } else if !Path::new("/dev/fuse").exists() {
        "no /dev/fuse"
    } else {
        return true;
    };
    if std::env::var_os("CI").is_some() {
        panic!("{test}: {reason}; CI is set, so this test must run (as root, with /dev/fuse)");
    }
    let _ = std::io::stderr().write_all(
        format!(
            "\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
             SKIPPED: {test}: {reason}\n\
             !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
        )
        .as_bytes(),
    );
    false
}

#[test]
fn sigterm_stops_the_daemon_after_its_sockets_are_removed() {
    let mut d = Daemon::start(false);
    d.remove_sockets();
    d.stop_cleanly();
    // Its lock file was still there and is its own: removed at the stop.
    let left: Vec<_> = std::fs::read_dir(&d.run)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        left.is_empty(),
        "left behind in the run directory: {left:?}"
    );
}

#[test]
fn stop_leaves_alone_sockets_that_replaced_its_own() {
    let mut d = Daemon::start(false);
    d.remove_sockets();
    // Stand-ins for another program's sockets, created since at the same
    // paths: the stop must neither connect to them nor remove them.
    let control = UnixListener::bind(&d.control).unwrap();
    let nbd = UnixListener::bind(&d.nbd).unwrap();
    control.set_nonblocking(true).unwrap();
    nbd.set_nonblocking(true).unwrap();
    d.stop_cleanly();
    assert!(
        d.control.exists(),
        "the stop removed a control socket not its own"
    );
    assert!(d.nbd.exists(), "the stop removed an NBD socket not its own");
    for (name, listener) in [("control", &control), ("NBD", &nbd)] {
        assert!(
            listener.accept().is_err(),
            "the stopping daemon connected to the {name} socket now at its path"
        );
    }
}

#[test]
fn sigterm_unmounts_fuse_after_the_sockets_are_removed() {
    let test = "sigterm_unmounts_fuse_after_the_sockets_are_removed";
    if !fuse_ready(test) {
        return;
    }
    let mut d = Daemon::start(true);
    let fuse = d.fuse.clone().unwrap();
    assert!(is_mount_point(&fuse), "FUSE not mounted: {}", d.log());
    d.remove_sockets();
    d.stop_cleanly();
    assert!(
        !is_mount_point(&fuse),
        "{} is still a mount point after the stop: {}",
        fuse.display(),
        d.log()
    );
    assert!(d.log().contains("FUSE volumes unmounted"), "{}", d.log());
}
