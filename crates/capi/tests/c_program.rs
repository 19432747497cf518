//! The C library from C: builds `blksnapd`, starts it on a socket in a
//! temporary directory (no root needed: image files), compiles
//! `tests/cycle.c` and `tests/session.c` against the generated `blksnap.h`
//! and `libblksnap.so` with `-Wall -Wextra -Werror -pedantic`, runs the
//! first through a full cycle of every command and its error paths and the
//! second through a session (writes and reads through the daemon's NBD
//! exports), then stops the daemon with SIGTERM. Also compiles
//! `tests/uapi_names.c` (blksnap.h beside stand-ins for every name of the
//! kernel's <linux/blksnap.h>) as C, both ways round, and as C++.

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

/// Compiles `tests/<source>` with `compiler` and `flags`, -pedantic -Wall
/// -Wextra -Werror, against `include`; `more` adds the output arguments.
fn compile(
    compiler: &str,
    include: &Path,
    flags: &[&str],
    source: &str,
    more: impl FnOnce(&mut Command),
) {
    let mut cc = Command::new(compiler);
    cc.args(flags)
        .args(["-pedantic", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(include)
        .arg(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests")
                .join(source),
        );
    more(&mut cc);
    let output = cc.output().expect("run the compiler");
    assert!(
        output.status.success(),
        "{compiler} {flags:?} {source} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
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
    compile("cc", &include, &["-std=c11"], "cycle.c", |cc| {
        cc.arg("-o")
            .arg(&program)
            .arg("-L")
            .arg(&target)
            .arg("-lblksnap")
            .arg(format!("-Wl,-rpath,{}", target.display()));
    });
    let session_program = dir.join("session");
    compile("cc", &include, &["-std=c11"], "session.c", |cc| {
        cc.arg("-o")
            .arg(&session_program)
            .arg("-L")
            .arg(&target)
            .arg("-lblksnap")
            .arg(format!("-Wl,-rpath,{}", target.display()));
    });
    // No clash with the kernel's uapi names, in either order, in C and C++.
    for flags in [&["-std=c11"][..], &["-std=c11", "-DUAPI_FIRST"]] {
        compile("cc", &include, flags, "uapi_names.c", |cc| {
            cc.arg("-fsyntax-only");
        });
    }
    compile(
        "c++",
        &include,
        &["-x", "c++", "-std=c++17"],
        "uapi_names.c",
        |cc| {
            cc.arg("-fsyntax-only");
        },
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

    // (d) the session.
    let session_disk = dir.join("session.img");
    image(&session_disk, 8 << 20);
    let output = Command::new(&session_program)
        .arg(&socket)
        .arg(&session_disk)
        .arg(&storage)
        .env_remove("BLKSNAP_CONTROL")
        .output()
        .expect("run the session program");
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    assert!(
        output.status.success(),
        "session failed ({}):\n{stdout}\n{}\nblksnapd log:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr),
        daemon.log()
    );
    for expected in [
        "ok   rc == 0 && already",
        "ok   nbd_io(image, 0, MIB, block, sizeof block) == 0 && all(block, sizeof block, 0x11)",
        "ok   blksnap_session_error(s, &e) == 0",
        "ok   blksnap_snapshot_collect(c, NULL, 0, &n) == 0 && n == 0",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
    let session_checks: u32 = stdout
        .lines()
        .last()
        .and_then(|l| l.strip_prefix("session: "))
        .and_then(|s| s.strip_suffix(" checks passed"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no summary line in:\n{stdout}"));
    assert!(session_checks >= 30, "only {session_checks} checks");

    // (e) SIGTERM: a clean stop.
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
