//! The C library from C: builds `blksnapd`, starts it on a socket in a
//! temporary directory (no root needed: image files), compiles
//! `tests/cycle.c` against the generated `blksnap.h` and `libblksnap.so`
//! with `-Wall -Wextra -Werror -pedantic`, runs it through a full cycle of
//! every command and its error paths, then stops the daemon with SIGTERM.

use std::fs::File;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// `<target dir>[/<triple>]/<profile dir>`: this test runs from its
/// `deps/`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("the test binary's directory");
    assert_eq!(
        deps.file_name().and_then(|n| n.to_str()),
        Some("deps"),
        "{}",
        exe.display()
    );
    deps.parent().expect("the profile directory").to_path_buf()
}

/// `cargo build` with the profile, target triple and target directory this
/// test was built with, read off [`profile_dir`]: `debug` is the `dev`
/// profile, any other directory is named after its profile; a target
/// directory root holds Cargo's `CACHEDIR.TAG`, a `<triple>` directory
/// under it does not. Cargo hands a test no other package's binary, nor
/// this package's cdylib, so they are built here, always (Cargo rebuilds
/// only what changed; a stale artifact would otherwise be tested).
fn cargo_build_same_profile(target: &Path) -> Command {
    let name = target
        .file_name()
        .and_then(|n| n.to_str())
        .expect("profile directory name");
    let profile = if name == "debug" { "dev" } else { name };
    let parent = target.parent().expect("the target directory");
    let mut command = Command::new(env!("CARGO"));
    command.args(["build", "--profile", profile]);
    if parent.join("CACHEDIR.TAG").exists() {
        command.arg("--target-dir").arg(parent);
    } else {
        command
            .arg("--target")
            .arg(parent.file_name().expect("target triple"))
            .arg("--target-dir")
            .arg(parent.parent().expect("the target directory"));
    }
    command
}

/// Kills the daemon if the test ends early.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn image(path: &Path, size: u64) {
    File::create(path)
        .and_then(|f| f.set_len(size))
        .expect("create an image file");
}

#[test]
fn c_program_drives_a_full_cycle() {
    let started = Instant::now();
    let target = profile_dir();
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");

    // (a) the daemon and the library itself (`cargo test` builds only its
    // rlib, not libblksnap.so), with this test's profile.
    let status = cargo_build_same_profile(&target)
        .args([
            "-p",
            "blksnap-daemon",
            "--bin",
            "blksnapd",
            "-p",
            "blksnap-capi",
            "--lib",
        ])
        .current_dir(&workspace)
        .status()
        .expect("run cargo build");
    assert!(status.success(), "cargo build of blksnapd failed: {status}");
    let blksnapd = target.join("blksnapd");
    assert!(blksnapd.exists(), "{} missing", blksnapd.display());

    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let (a, b, append) = (dir.join("a.img"), dir.join("b.img"), dir.join("append.img"));
    image(&a, 8 << 20);
    image(&b, 8 << 20);
    image(&append, 8 << 20);
    let storage = dir.join("diff");
    std::fs::create_dir(&storage).expect("storage directory");
    let socket = dir.join("ctl.sock");
    let log = dir.join("blksnapd.log");
    let log_file = File::create(&log).expect("log file");
    let mut command = Command::new(&blksnapd);
    command
        .arg("--control")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.join("state"));
    // A daemon with an NBD frontend serves it on a socket of its own, by
    // default in /run/blksnap: keep this one's in the temporary directory.
    let help = Command::new(&blksnapd)
        .arg("--help")
        .output()
        .expect("blksnapd --help");
    if String::from_utf8_lossy(&help.stdout).contains("--nbd-socket") {
        command.arg("--nbd-socket").arg(dir.join("nbd.sock"));
    }
    let child = command
        .env_remove("BLKSNAP_CONTROL")
        .env("BLKSNAP_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().expect("log file"))
        .stderr(log_file)
        .spawn()
        .expect("start blksnapd");
    let mut daemon = Daemon { child, log };
    let deadline = Instant::now() + Duration::from_secs(10);
    while UnixStream::connect(&socket).is_err() {
        if let Some(status) = daemon.child.try_wait().expect("try_wait") {
            panic!("blksnapd exited early ({status}):\n{}", daemon.log());
        }
        assert!(
            Instant::now() < deadline,
            "no control socket after 10 s:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // (b) the C program, against the generated header and the library.
    let include = target.join("include");
    assert!(
        include.join("blksnap.h").exists(),
        "{}/blksnap.h missing",
        include.display()
    );
    assert!(
        target.join("libblksnap.so").exists(),
        "libblksnap.so missing in {}",
        target.display()
    );
    assert!(
        target.join("pkgconfig/blksnap.pc").exists(),
        "blksnap.pc missing"
    );
    let program = dir.join("cycle");
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cycle.c");
    let output = Command::new("cc")
        .args(["-std=c11", "-pedantic", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(&include)
        .arg(&source)
        .arg("-o")
        .arg(&program)
        .arg("-L")
        .arg(&target)
        .arg("-lblksnap")
        .arg(format!("-Wl,-rpath,{}", target.display()))
        .output()
        .expect("run cc");
    assert!(
        output.status.success(),
        "cc failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    // (c) the cycle.
    let output = Command::new(&program)
        .arg(&socket)
        .arg(&a)
        .arg(&b)
        .arg(&storage)
        .arg(&append)
        .arg(dir.join("missing.img"))
        .env_remove("BLKSNAP_CONTROL")
        .output()
        .expect("run the C program");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "cycle failed ({}):\n{stdout}\n{stderr}\nblksnapd log:\n{}",
        output.status,
        daemon.log()
    );
    for expected in [
        "ok   blksnap_snapshot_take(c, id1) = 0",
        "ok   blksnap_markdirtyblock(c, \"disk-a\", &dirty, 1) = 0",
        "ok   blksnap_snapshot_waitevent(c, id1, 10, &event) = 0",
        "ok   blksnap_detach(c, \"disk-a\") = -16",
        "ok   blksnap_attach(c, missing, NULL, NULL, 0) = -2",
        "ok   blksnap_snapshot_take(c, random_id) = -2",
        "ok   count == 128 && map[16] == 2 && all_zero(map, count, 16)",
        "ok   blksnap_detach(c, a_path) = 0",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
    let summary = stdout.lines().last().unwrap_or_default();
    let passed: u32 = summary
        .strip_prefix("cycle: ")
        .and_then(|s| s.strip_suffix(" checks passed"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no summary line: {summary:?}"));
    assert!(passed >= 80, "only {passed} checks");

    // (d) SIGTERM: a clean stop.
    let pid = daemon.child.id().to_string();
    let status = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -TERM {pid} failed");
    let status = daemon
        .wait_timeout(Duration::from_secs(15))
        .unwrap_or_else(|| {
            panic!(
                "blksnapd still running 15 s after SIGTERM:\n{}",
                daemon.log()
            )
        });
    assert!(
        status.success(),
        "blksnapd exited with {status}:\n{}",
        daemon.log()
    );
    assert!(!socket.exists(), "blksnapd left its socket behind");
    eprintln!(
        "c_program: {passed} checks in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
