//! Issue 14, seen from outside a real `blksnapd`: the files it creates
//! (no symlink followed, no other user's directory used, socket modes
//! whatever the umask), device names that stay safe in URIs, paths and
//! `key=value` output, and a control socket that idle clients of another
//! user cannot close to root, that times idle clients out and that
//! refuses clients during a stop. Tests that need root (chown, mounts, a
//! throw-away user) fail without it in CI and skip loudly outside.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use blksnap_test_support::is_root;
use common::{blksnapd, blksnapd_command, exists, wait_until, Daemon};

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

/// Whether a root-only test can run; a loud skip outside CI, a failure in it.
fn root(test: &str) -> bool {
    if is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test} needs root, and CI is set: it must run"
    );
    eprintln!("!!!!!!!!!!\nSKIPPED: {test}: needs root\n!!!!!!!!!!");
    false
}

/// Waits (up to 10 s) for a process that should exit by itself; kills it
/// and fails if it does not (a daemon that started instead of refusing).
fn finished(mut child: Child) -> Output {
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "still running after 10 s: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// A daemon with these sockets that must refuse to start: its message.
fn refused(control: &Path, nbd: &Path, state: &Path, extra: &[&str]) -> String {
    let child = blksnapd_command(control, state)
        .arg("--nbd-socket")
        .arg(nbd)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = finished(child);
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default().to_string();
    assert!(last.starts_with("blksnapd: "), "{stderr}");
    last
}

fn assert_has(text: &str, needles: &[&str]) {
    for n in needles {
        assert!(text.contains(n), "{text:?} lacks {n:?}");
    }
}

/// A file and a directory that must come out of every refused start as
/// they went in.
struct Targets {
    file: PathBuf,
    dir: PathBuf,
}

impl Targets {
    fn new(root: &Path) -> Self {
        let file = root.join("precious");
        std::fs::write(&file, b"precious\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let dir = root.join("real");
        std::fs::create_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        Self { file, dir }
    }

    fn unchanged(&self) {
        assert_eq!(std::fs::read(&self.file).unwrap(), b"precious\n");
        assert_eq!(mode(&self.file), 0o644);
        assert_eq!(mode(&self.dir), 0o755);
        let entries: Vec<_> = std::fs::read_dir(&self.dir).unwrap().collect();
        assert!(entries.is_empty(), "created through a link: {entries:?}");
    }
}

#[test]
fn symlinked_lock_file_and_socket_and_fuse_directories_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let targets = Targets::new(t);
    let state = t.join("state");

    // The lock file, a symlink to a file the daemon would truncate.
    std::fs::create_dir(t.join("a")).unwrap();
    symlink(&targets.file, t.join("a/control.sock.lock")).unwrap();
    let err = refused(
        &t.join("a/control.sock"),
        &t.join("a/nbd.sock"),
        &state,
        &[],
    );
    assert_has(&err, &["lock file", "a/control.sock.lock", "is a symlink"]);
    assert!(!exists(&t.join("a/control.sock")) && !exists(&t.join("a/nbd.sock")));
    targets.unchanged();

    // The control socket's directory, the NBD socket's, the FUSE one.
    symlink(&targets.dir, t.join("link")).unwrap();
    let err = refused(
        &t.join("link/control.sock"),
        &t.join("b/nbd.sock"),
        &state,
        &[],
    );
    assert_has(&err, &["control socket directory", "link", "is a symlink"]);
    let err = refused(
        &t.join("c/control.sock"),
        &t.join("link/nbd.sock"),
        &state,
        &[],
    );
    assert_has(&err, &["NBD socket directory", "link", "is a symlink"]);
    let link = t.join("link");
    let err = refused(
        &t.join("d/control.sock"),
        &t.join("d/nbd.sock"),
        &state,
        &["--fuse-dir", link.to_str().unwrap()],
    );
    assert_has(&err, &["FUSE directory", "link", "is a symlink"]);
    targets.unchanged();
}

/// The lazy unmount of a stale FUSE mount does not follow a symlink
/// either: a link to another mount would have unmounted it.
#[test]
fn a_fuse_dir_symlinked_to_a_mount_leaves_the_mount_alone() {
    if !root("a_fuse_dir_symlinked_to_a_mount_leaves_the_mount_alone") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let mnt = t.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "blksnap-test", mnt.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(ok.success(), "mount -t tmpfs failed");
    let mounted = || {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .any(|l| l.split(' ').nth(4) == Some(mnt.to_str().unwrap()))
    };
    assert!(mounted());
    symlink(&mnt, t.join("dev")).unwrap();
    let dev = t.join("dev");
    let err = refused(
        &t.join("run/control.sock"),
        &t.join("run/nbd.sock"),
        &t.join("state"),
        &["--fuse-dir", dev.to_str().unwrap()],
    );
    let still = mounted();
    let _ = Command::new("umount").arg(&mnt).status();
    assert_has(&err, &["FUSE directory", "is a symlink"]);
    assert!(
        still,
        "the daemon unmounted {} through a symlink",
        mnt.display()
    );
}

#[test]
fn directories_of_another_user_are_refused_roots_are_used() {
    if !root("directories_of_another_user_are_refused_roots_are_used") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    for dir in ["theirs", "theirs-dev"] {
        std::fs::create_dir(t.join(dir)).unwrap();
        std::os::unix::fs::chown(t.join(dir), Some(65534), Some(65534)).unwrap();
    }
    let err = refused(
        &t.join("theirs/control.sock"),
        &t.join("run/nbd.sock"),
        &t.join("state"),
        &[],
    );
    assert_has(&err, &["control socket directory", "theirs", "uid 65534"]);
    let fuse = t.join("theirs-dev");
    let err = refused(
        &t.join("run/control.sock"),
        &t.join("run/nbd.sock"),
        &t.join("state"),
        &["--fuse-dir", fuse.to_str().unwrap()],
    );
    assert_has(&err, &["FUSE directory", "theirs-dev", "uid 65534"]);
    assert!(!exists(&t.join("theirs/control.sock.lock")));
    // Root's own directory, as it is: used, mode untouched.
    std::fs::create_dir(t.join("roots")).unwrap();
    std::fs::set_permissions(t.join("roots"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut d = blksnapd_command(&t.join("roots/control.sock"), &t.join("state"))
        .arg("--nbd-socket")
        .arg(t.join("roots/nbd.sock"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let up = wait_until(Duration::from_secs(10), || {
        UnixStream::connect(t.join("roots/control.sock")).is_ok()
    });
    let _ = d.kill();
    let _ = d.wait();
    assert!(up, "blksnapd did not start in a directory of root's");
    assert_eq!(mode(&t.join("roots")), 0o755);
}

/// `blksnapd` started under `umask 000` (through sh, which sets it).
fn start_under_umask_000(t: &Path, control: &Path, nbd: &Path, config: &str) -> Child {
    std::fs::write(t.join("blksnapd.toml"), config).unwrap();
    let child = Command::new("sh")
        .arg("-c")
        .arg("umask 000 && exec \"$@\"")
        .arg("sh")
        .arg(blksnapd())
        .arg("--control")
        .arg(control)
        .arg("--nbd-socket")
        .arg(nbd)
        .arg("--state-dir")
        .arg(t.join("state"))
        .arg("--config")
        .arg(t.join("blksnapd.toml"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || UnixStream::connect(control)
            .is_ok()),
        "blksnapd did not start"
    );
    child
}

#[test]
fn sockets_and_directories_get_their_modes_under_umask_000() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let (control, nbd) = (t.join("run/control.sock"), t.join("run/nbd.sock"));
    let mut d = start_under_umask_000(t, &control, &nbd, "");
    let modes = [
        mode(&t.join("run")),
        mode(&control),
        mode(&nbd),
        mode(&t.join("run/control.sock.lock")),
    ];
    let _ = d.kill();
    let _ = d.wait();
    assert_eq!(
        modes,
        [0o700, 0o600, 0o600, 0o600],
        "run/, control, nbd, lock"
    );

    // With nbd_socket_group: 0660 and the group, in a directory of its own
    // made 0750 for that group. (Root may give any group; others their own.)
    let gid = if is_root() {
        4243
    } else {
        std::fs::metadata("/proc/self").unwrap().gid()
    };
    let (control, nbd) = (t.join("run2/control.sock"), t.join("nbd/nbd.sock"));
    let config = format!("nbd_socket_group = \"{gid}\"\n");
    let mut d = start_under_umask_000(t, &control, &nbd, &config);
    let got = [
        (
            mode(&t.join("run2")),
            std::fs::metadata(t.join("run2")).unwrap().gid() == gid,
        ),
        (
            mode(&t.join("nbd")),
            std::fs::metadata(t.join("nbd")).unwrap().gid() == gid,
        ),
        (mode(&nbd), std::fs::metadata(&nbd).unwrap().gid() == gid),
        (mode(&control), false),
    ];
    let _ = d.kill();
    let _ = d.wait();
    assert_eq!(
        got,
        [(0o700, false), (0o750, true), (0o660, true), (0o600, false)],
        "run2/, nbd/, nbd socket, control socket"
    );
}

#[test]
fn unsafe_device_names_are_refused_at_attach() {
    let d = Daemon::start();
    d.image("a.img", 1 << 20);
    let long = "n".repeat(256);
    for name in ["a?b", "a#b", "a\nb", "a/b", "a b", "a%20", "", &long] {
        d.fails(
            &["attach", "--device", "a.img", "--name", name],
            &["device name", "is not allowed"],
        );
    }
    for name in ["..", ".", "snapshot"] {
        d.fails(
            &["attach", "--device", "a.img", "--name", name],
            &["device name", "is reserved", "--name"],
        );
    }
    d.fails(
        &["attach", "--device", "a.img", "--name=-o"],
        &["must not start with '-'"],
    );
    // A NUL travels in JSON as \u0000; the protocol carries it to the check.
    let request = format!(
        "{{\"command\":\"attach\",\"args\":{{\"device\":\"{}\",\"name\":\"a\\u0000b\"}}}}\n",
        d.path("a.img").display()
    );
    let reply = d.raw(request.as_bytes(), 1);
    assert_eq!(reply[0]["ok"], false, "{}", reply[0]);
    assert_eq!(reply[0]["error"]["errno"], 22, "{}", reply[0]);
    assert_has(
        reply[0]["error"]["message"].as_str().unwrap(),
        &["is not allowed"],
    );
    // A file whose name is no device name needs --name.
    d.image("my disk.img", 1 << 20);
    d.fails(
        &["attach", "--device", "my disk.img"],
        &["\"my disk.img\"", "--name"],
    );
    assert_eq!(d.ok(&["list"]), "", "nothing attached");
    d.ok(&["attach", "--device", "my disk.img", "--name", "my-disk.img"]);
    d.ok(&["attach", "--device", "a.img", "--name", &"n".repeat(255)]);
    let list = d.ok(&["list"]);
    assert_eq!(list.lines().count(), 2, "{list}");
}

#[test]
fn a_recorded_device_with_an_unsafe_name_is_missing_not_attached() {
    let mut d = Daemon::start();
    d.image("a.img", 1 << 20);
    d.ok(&["attach", "--device", "a.img", "--name", "good"]);
    let dir = d.stop_keep_dir();
    // A record from before names were checked.
    let devices = dir.path().join("state/devices");
    let record = std::fs::read_dir(&devices)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "json"))
        .unwrap();
    let id = record.file_stem().unwrap().to_str().unwrap().to_string();
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    json["name"] = "x\nmissing=evil path=/ reason=?#".into();
    std::fs::write(&record, serde_json::to_vec(&json).unwrap()).unwrap();

    let d = Daemon::start_in(dir, &[]);
    d.wait_log(&["record-bad-name", &id]);
    let list = d.ok(&["list"]);
    let lines: Vec<&str> = list.lines().collect();
    assert_eq!(lines.len(), 1, "{list:?}");
    assert!(
        lines[0].starts_with(&format!("missing={id} path="))
            && lines[0].contains("record-bad-name"),
        "{list:?}"
    );
    d.fails(&["cbtinfo", "--device", "good"], &["good"]);
    d.ok(&["detach", "--device", &id]);
    assert_eq!(d.ok(&["list"]), "");
    d.ok(&["attach", "--device", "a.img", "--name", "good"]);
}

#[test]
fn an_idle_control_connection_is_closed_after_the_idle_timeout() {
    let config = tempfile::tempdir().unwrap();
    let path = config.path().join("blksnapd.toml");
    std::fs::write(&path, "control_idle_timeout_ms = 500\n").unwrap();
    let d = Daemon::start_with(&["--config", path.to_str().unwrap()]);
    let started = Instant::now();
    let stream = UnixStream::connect(&d.control).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut text = String::new();
    (&stream).read_to_string(&mut text).unwrap();
    let took = started.elapsed();
    let reply: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(reply["error"]["name"], "ETIMEDOUT", "{reply}");
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(5),
        "closed after {took:?}"
    );
    // Clients that talk are served as before.
    assert_eq!(d.ok(&["version"]), concat!(env!("CARGO_PKG_VERSION"), "\n"));
}

#[test]
fn a_connection_opened_during_a_stop_is_refused_at_once() {
    let mut d = Daemon::start();
    d.image("a.img", 1 << 20);
    d.ok(&["attach", "--device", "a.img"]);
    let id = d.create("a.img");
    // A request in flight holds the stop in its drain for 1.5 s.
    let mut waiter = UnixStream::connect(&d.control).unwrap();
    let request = format!(
        "{{\"command\":\"snapshot_waitevent\",\"args\":{{\"id\":\"{id}\",\"timeout_ms\":1500}}}}\n"
    );
    waiter.write_all(request.as_bytes()).unwrap();
    d.wait_log(&["SnapshotWaitevent"]);
    d.ok(&["shutdown"]);
    let started = Instant::now();
    match UnixStream::connect(&d.control) {
        Err(e) => assert_eq!(e.raw_os_error(), Some(111), "{e}"),
        Ok(late) => {
            late.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut text = String::new();
            (&late)
                .read_to_string(&mut text)
                .expect("closed, not hanging");
            assert!(text.is_empty() || text.contains("ESHUTDOWN"), "{text}");
        }
    }
    assert!(started.elapsed() < Duration::from_secs(2));
    let mut reply = String::new();
    BufReader::new(&waiter).read_line(&mut reply).unwrap();
    assert!(reply.contains("\"ok\":true"), "{reply}");
    assert!(d.stop_or_status().success());
}

/// A child process killed (and reaped) on drop, so that a failed test
/// leaves no process behind that keeps its user from being removed.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A throw-away user (and its own group), removed on drop.
struct TestUser {
    name: String,
    uid: u32,
    gid: u32,
}

impl TestUser {
    fn create() -> Self {
        let name = format!("bsnh{}", std::process::id());
        // useradd takes a lock on /etc/passwd: retried while another
        // test (or helper) holds it.
        let mut made = false;
        for _ in 0..50 {
            let out = Command::new("useradd")
                .args([
                    "--no-create-home",
                    "--user-group",
                    "--shell",
                    "/usr/sbin/nologin",
                    &name,
                ])
                .output()
                .unwrap();
            if out.status.success() {
                made = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(made, "useradd {name} failed");
        let id = |flag: &str| -> u32 {
            let out = Command::new("id").args([flag, &name]).output().unwrap();
            String::from_utf8(out.stdout)
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        let (uid, gid) = (id("-u"), id("-g"));
        Self { name, uid, gid }
    }

    /// A command run as this user, with its group as the only one.
    fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new(program);
        c.uid(self.uid).gid(self.gid);
        c
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        let removed = (0..50).any(|_| {
            let ok = Command::new("userdel")
                .arg(&self.name)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                std::thread::sleep(Duration::from_millis(100));
            }
            ok
        });
        if !removed {
            eprintln!(
                "WARNING: cannot remove the test user {}: userdel {0}",
                self.name
            );
        }
        let _ = Command::new("groupdel")
            .arg(&self.name)
            .stderr(Stdio::null())
            .status();
    }
}

/// Issue 14 (7a): a user of `control_group` holding as many idle
/// connections as `control_max_connections_per_uid` allows gets no more,
/// and root still gets in: `list`, then `shutdown`.
#[test]
fn idle_connections_of_another_user_do_not_lock_root_out() {
    if !root("idle_connections_of_another_user_do_not_lock_root_out") {
        return;
    }
    let user = TestUser::create();
    let tmp = tempfile::tempdir().unwrap();
    // Traversable for the user (the run directory is made 0750 for its group).
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let config = tmp.path().join("blksnapd.toml");
    std::fs::write(
        &config,
        format!(
            "control_group = \"{}\"\ncontrol_max_connections = 4\ncontrol_max_connections_per_uid = 2\ncontrol_idle_timeout_ms = 0\n",
            user.gid
        ),
    )
    .unwrap();
    let mut d = Daemon::start_in(tmp, &["--config", config.to_str().unwrap()]);
    assert_eq!(mode(&d.path("run")), 0o750);
    let mut holder = Killed(
        user.command("perl")
        .args([
            "-MIO::Socket::UNIX",
            "-e",
            "my @s; for (1..$ARGV[1]) { push @s, IO::Socket::UNIX->new(Peer => $ARGV[0]) or die \"connect: $!\\n\" } $| = 1; print \"held\\n\"; sleep 60",
            d.control.to_str().unwrap(),
            "2",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(holder.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "held\n", "the user's connections");
    let started = Instant::now();
    // The user's third connection: refused, with the reason.
    let out = user
        .command(common::blksnap())
        .arg("version")
        .env("BLKSNAP_CONTROL", &d.control)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_has(
        &stderr,
        &[
            "too many control connections from uid",
            &user.uid.to_string(),
        ],
    );
    // Root: served, and can stop the daemon.
    assert_eq!(d.ok(&["list"]), "");
    d.ok(&["shutdown"]);
    let status = d.stop_or_status();
    let took = started.elapsed();
    drop(holder);
    assert!(status.success(), "{}", d.log());
    assert!(
        took < Duration::from_secs(5),
        "root's list and shutdown took {took:?}"
    );
}
