//! Stock NBD tools for the tests that drive them against a real blksnapd:
//! whether a tool is here (a loud skip outside CI, a failure in CI), a
//! command that must succeed, `nbdinfo --map` parsed, an export copied out
//! with nbdcopy, and a device of known random content.

use std::process::{Command, Output};

use blksnap_test_support::Pattern;

use super::Daemon;

pub fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "{tool} is missing in CI: scripts/install-deps installs it"
        );
        eprintln!("SKIPPED: {tool} is not installed (run scripts/install-deps)");
    }
    found
}

pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `nbdinfo --map` lines as (offset, length, type).
pub fn map(uri: &str, context: &str) -> Vec<(u64, u64, u32)> {
    let out = run(Command::new("nbdinfo")
        .arg(format!("--map={context}"))
        .arg(uri));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect()
}

/// The whole export, copied with nbdcopy.
pub fn read_all(d: &Daemon, uri: &str) -> Vec<u8> {
    let path = d.path("read_all.copy");
    let _ = std::fs::remove_file(&path);
    run(Command::new("nbdcopy").args([uri, path.to_str().unwrap()]));
    let data = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    data
}

/// A device `name` of `size` random bytes (pattern `seed`) in the daemon's
/// directory, attached; returns its content.
pub fn random_device(d: &Daemon, name: &str, size: u64, seed: u64) -> Vec<u8> {
    let data = Pattern::Random.bytes(seed, size);
    std::fs::write(d.path(name), &data).unwrap();
    d.ok(&["attach", "--device", name]);
    data
}

/// Parses a qemu-io `wrote N/N bytes at offset O` line into (O, N).
pub fn wrote(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("wrote ")?;
    let (counts, offset) = rest.split_once(" bytes at offset ")?;
    let (done, asked) = counts.split_once('/')?;
    assert_eq!(done, asked, "short write: {line}");
    Some((offset.trim().parse().unwrap(), done.parse().unwrap()))
}

/// Writes `(offset, length)` ranges of byte `pattern` through the daemon's
/// NBD export of `export` with one qemu-io; asserts each was acknowledged.
pub fn nbd_write(d: &Daemon, export: &str, writes: &[(u64, u64)], pattern: u8) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for (at, len) in writes {
        cmd.arg("-c").arg(format!("write -P {pattern} {at} {len}"));
    }
    cmd.arg(d.uri(export));
    let out = run(&mut cmd);
    let text = String::from_utf8_lossy(&out.stdout);
    let acknowledged: Vec<(u64, u64)> = text.lines().filter_map(wrote).collect();
    assert_eq!(acknowledged, writes, "qemu-io on {export}: {text}");
}
