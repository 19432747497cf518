//! External commands under `timeout`, and mounts, loop devices and
//! processes, for the root tests on local devices (`local.rs`,
//! `backup_local.rs`), which include it with `#[path]`. The including test
//! defines `COMMAND_TIMEOUT`, the longest any of its commands may run.

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

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
