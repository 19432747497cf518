//! The compatibility suite (issue 16 item 8): the original blksnap test
//! suite's scenarios, ported to `tests/compat/scenarios/`, run by
//! `tests/compat/run` against the `blksnap` and `blksnapd` of the profile
//! under test (put first on PATH; nothing else is built). The runner
//! starts its own daemon on a temporary directory and cleans up after
//! itself (docs/blksnap.md, COMPATIBILITY).
//!
//! Needs root, /dev/fuse and loop devices. Without them the runner says
//! SKIPPED loudly and succeeds, unless CI is set: then it fails, and so
//! does this test. A failed scenario fails the test with the runner's
//! report, which holds that scenario's whole output.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository's root: two levels above this package.
fn repository() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("crates/cli inside the repository")
        .to_path_buf()
}

#[test]
fn original_suite_scenarios() {
    let daemon = common::blksnapd();
    let cli = PathBuf::from(common::blksnap());
    let mut path = vec![
        cli.parent().unwrap().to_path_buf(),
        daemon.parent().unwrap().to_path_buf(),
    ];
    path.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    let runner = repository().join("tests/compat/run");
    let out = Command::new(&runner)
        .env("PATH", std::env::join_paths(path).unwrap())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", runner.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "tests/compat/run failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    // Past the harness's capture, so that a skip is seen.
    let _ = std::io::stderr().write_all(format!("{stdout}{stderr}").as_bytes());
    let skipped = stderr.contains("SKIPPED");
    assert!(
        skipped || stdout.contains("compat: all "),
        "tests/compat/run succeeded without its summary line:\n{stdout}\n{stderr}"
    );
}
