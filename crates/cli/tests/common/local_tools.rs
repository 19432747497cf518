//! External commands under `timeout`, and mounts, loop devices and
//! processes, for the root tests on local devices (`local.rs`,
//! `backup_local.rs`), which include it with `#[path]`: what a test holds
//! ([`Held`]), its watchdog, and letting go of it ([`release`]). The
//! including test defines `COMMAND_TIMEOUT` (the longest any of its
//! commands may run) and `WATCHDOG` (when a test counts as wedged).

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::common::wait_until;

pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// `timeout -k 5 <COMMAND_TIMEOUT> <prog>`: a hung command fails the test
/// instead of hanging it (timeout runs it in its own process group).
pub fn command(prog: &str) -> Command {
    command_timeout(prog, crate::COMMAND_TIMEOUT)
}

pub fn command_timeout(prog: &str, seconds: &str) -> Command {
    let mut c = Command::new(which("timeout").unwrap_or_else(|| "timeout".into()));
    c.args(["-k", "5", seconds])
        .arg(which(prog).unwrap_or_else(|| prog.into()))
        .stdin(Stdio::null());
    c
}

pub fn try_run(prog: &str, args: &[&str]) -> Option<Output> {
    command(prog).args(args).output().ok()
}

pub fn run(prog: &str, args: &[&str]) -> Output {
    command(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"))
}

/// Runs a command, asserts success, returns stdout.
pub fn run_ok(prog: &str, args: &[&str]) -> String {
    let out = run(prog, args);
    assert!(
        out.status.success(),
        "{prog} {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn s(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// Straight to the test's stderr, past the test harness's capture.
pub fn loud(message: &str) {
    let _ = std::io::stderr().write_all(format!("\n{message}\n").as_bytes());
}

// ---------------------------------------------------------------------------
// Mounts, loop devices, processes.

/// (mount point, fstype, "major:minor") of every mount, from mountinfo.
pub fn mounts() -> Vec<(PathBuf, String, String)> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let dash = fields.iter().position(|f| *f == "-")?;
            Some((
                PathBuf::from(fields.get(4)?.replace("\\040", " ")),
                fields.get(dash + 1)?.to_string(),
                fields.get(2)?.to_string(),
            ))
        })
        .collect()
}

pub fn is_mounted(path: &Path) -> bool {
    mounts().iter().any(|(mp, _, _)| mp == path)
}

/// `umount`, and `umount -l` when that fails; never panics.
pub fn unmount(path: &Path) {
    if !is_mounted(path) {
        return;
    }
    let ok = try_run("umount", &[s(path)]).is_some_and(|o| o.status.success());
    if !ok && is_mounted(path) {
        loud(&format!(
            "umount {} failed: unmounting lazily",
            path.display()
        ));
        let _ = try_run("umount", &["-l", s(path)]);
    }
}

/// Aborts the FUSE connection mounted on `dir` (pending and future requests
/// fail at once), then unmounts it lazily. For a wedged daemon only.
pub fn abort_fuse(dir: &Path) {
    let connection = mounts()
        .into_iter()
        .find(|(mp, fstype, _)| mp == dir && fstype.starts_with("fuse"))
        .and_then(|(_, _, dev)| dev.split(':').nth(1).map(str::to_string));
    if let Some(minor) = connection {
        let connections = Path::new("/sys/fs/fuse/connections");
        if !connections.join(&minor).exists() {
            let _ = try_run("mount", &["-t", "fusectl", "none", s(connections)]);
        }
        let abort = connections.join(&minor).join("abort");
        match std::fs::write(&abort, "1") {
            Ok(()) => loud(&format!("aborted FUSE connection {}", abort.display())),
            Err(e) => loud(&format!("cannot abort {}: {e}", abort.display())),
        }
    }
    let _ = try_run("umount", &["-l", s(dir)]);
}

/// `losetup -a` lines whose backing file is under `dir`.
pub fn loops_under(dir: &Path) -> Vec<String> {
    try_run("losetup", &["-a"])
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(s(dir)))
        .map(str::to_string)
        .collect()
}

/// Whether process `pid` runs (a zombie has stopped).
pub fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X'),
        Err(_) => false,
    }
}

// ---------------------------------------------------------------------------
// What a test holds, and letting go of it.

#[derive(Default)]
pub struct Held {
    pub mounts: Vec<PathBuf>,
    /// Loop devices the test made with losetup.
    pub loops: Vec<String>,
    /// Loop devices the daemon made: (device, FUSE file relative to the
    /// FUSE directory).
    pub daemon_loops: Vec<(String, String)>,
}

/// Unblocks a wedged test: unmounts its mounts lazily and aborts its FUSE
/// connection, so blocked I/O fails. Does not kill the daemon.
pub fn watchdog(test: &str, held: Arc<Mutex<Held>>, done: Arc<AtomicBool>, fuse_dir: PathBuf) {
    let deadline = Instant::now() + crate::WATCHDOG;
    while !done.load(Ordering::SeqCst) {
        if Instant::now() >= deadline {
            loud(&format!(
                "WATCHDOG: {test} still runs after {:?}: unmounting lazily and \
                 aborting the FUSE connection",
                crate::WATCHDOG
            ));
            let mounts = held
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .mounts
                .clone();
            for m in mounts.iter().rev() {
                if is_mounted(m) {
                    let _ = try_run("umount", &["-l", s(m)]);
                }
            }
            abort_fuse(&fuse_dir);
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Lets go of everything a test held, even when its daemon is wedged:
/// unmounts (lazily, with the FUSE connection aborted, when unmounting
/// hangs), detaches the test's loop devices, stops the daemon (`shutdown
/// --force`, then the abort), and detaches loop devices left behind.
pub fn release(
    test: &str,
    held: Held,
    fuse_dir: &Path,
    work: &Path,
    control: &Path,
    pid: u32,
    daemon: Option<crate::common::Daemon>,
) {
    // Unmounting writes back through the daemon: if that hangs, the
    // daemon is wedged; lazy unmounts and an aborted FUSE connection
    // then fail the blocked I/O instead of hanging.
    let (sent, unmounted) = std::sync::mpsc::channel();
    let mounts = held.mounts.clone();
    std::thread::spawn(move || {
        for m in mounts.iter().rev() {
            unmount(m);
        }
        let _ = sent.send(());
    });
    if unmounted.recv_timeout(Duration::from_secs(30)).is_err() {
        loud(&format!(
            "{}: unmounting hangs: unmounting lazily and aborting the FUSE connection",
            test
        ));
        for m in held.mounts.iter().rev() {
            let _ = try_run("umount", &["-l", s(m)]);
        }
        abort_fuse(fuse_dir);
        let _ = unmounted.recv_timeout(Duration::from_secs(30));
    }
    for l in held.loops.iter().rev() {
        let _ = try_run("losetup", &["-d", l]);
    }
    if let Some(daemon) = daemon {
        if running(pid) {
            eprintln!("{}: blksnap shutdown --force", test);
            let _ = command_timeout(env!("CARGO_BIN_EXE_blksnap"), "15")
                .args(["shutdown", "--force"])
                .env("BLKSNAP_CONTROL", control)
                .output();
            if !wait_until(Duration::from_secs(20), || !running(pid)) {
                loud(&format!(
                    "{}: blksnapd {} is wedged: aborting its FUSE connection before killing it",
                    test, pid
                ));
                abort_fuse(fuse_dir);
            }
        }
        if is_mounted(fuse_dir) {
            loud(&format!(
                "{}: FUSE mount {} left behind: unmounting it lazily",
                test,
                fuse_dir.display()
            ));
            abort_fuse(fuse_dir);
        }
        // Kills the daemon only if it still runs (wedged, aborted above).
        drop(daemon);
    }
    // A daemon killed after an abort leaves its loop devices bound to
    // files of the dead FUSE mount (shown relative to it once it is
    // detached): detach those, and only those.
    for (device, file) in &held.daemon_loops {
        let sys = format!(
            "/sys/block/{}/loop/backing_file",
            device.trim_start_matches("/dev/")
        );
        let Ok(backing) = std::fs::read_to_string(&sys) else {
            continue;
        };
        let backing = backing.trim();
        if backing == s(&fuse_dir.join(file)) || backing == format!("/{file}") {
            loud(&format!(
                "{}: loop device {device} of the daemon left behind: detaching it",
                test
            ));
            let _ = try_run("losetup", &["-d", device]);
        }
    }
    let left = loops_under(work);
    if !left.is_empty() {
        loud(&format!("{}: loop devices left behind: {left:?}", test));
        for line in left {
            if let Some((device, _)) = line.split_once(':') {
                let _ = try_run("losetup", &["-d", device]);
            }
        }
    }
}
