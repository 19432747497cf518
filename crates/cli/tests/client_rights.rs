//! The paths a client names are opened with its rights (docs/blksnapd.md,
//! SECURITY MODEL, "Paths named by clients"): a real blksnapd run as root
//! with `control_group` set to the group of a throw-away user made here
//! (useradd, removed at the end however the test ends), and the real
//! `blksnap` CLI run as that user. Block devices used as storage are held
//! exclusively, and a storage file with content needs `--overwrite`.
//!
//! Needs root, useradd/userdel and losetup (/dev/loop-control). Outside CI
//! a test that cannot run passes with a loud SKIPPED line; with CI set it
//! fails.

mod common;

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use blksnap_test_support::is_root;
use common::Daemon;

const TOOLS: &[&str] = &["useradd", "userdel", "losetup"];

fn which(name: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// Whether the test can run here; a loud SKIPPED line when not, a failure
/// when CI is set.
fn ready(test: &str) -> bool {
    let reason = if !is_root() {
        Some("needs root".to_string())
    } else if !Path::new("/dev/loop-control").exists() {
        Some("no /dev/loop-control".to_string())
    } else {
        TOOLS
            .iter()
            .find(|t| which(t).is_none())
            .map(|t| format!("{t} not found"))
    };
    let Some(reason) = reason else {
        return true;
    };
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: {reason}; CI is set, so this test must run (as root)"
    );
    eprintln!(
        "\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\nSKIPPED: {test}: {reason}\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
    );
    false
}

fn run_ok(prog: &str, args: &[&str]) -> String {
    let out = Command::new(which(prog).unwrap())
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{prog} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A user (and its group of the same name) that exists until drop. Not in
/// `disk` or any other group.
struct User {
    name: String,
    uid: u32,
    gid: u32,
}

impl User {
    fn new() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let name = format!("bsr{}x{nanos:x}", std::process::id());
        run_ok(
            "useradd",
            &[
                "-M",
                "-U",
                "-s",
                "/usr/sbin/nologin",
                "-d",
                "/nonexistent",
                &name,
            ],
        );
        // From here on, drop removes it whatever fails.
        let mut user = Self {
            name,
            uid: 0,
            gid: 0,
        };
        let id = |flag: &str| -> u32 { run_ok("id", &[flag, &user.name]).trim().parse().unwrap() };
        user.uid = id("-u");
        user.gid = id("-g");
        assert_ne!(user.uid, 0);
        user
    }

    /// `blksnap ARGS` as this user (std drops root's supplementary groups:
    /// only the user's own group).
    fn cli(&self, daemon: &Daemon, args: &[&str]) -> Output {
        Command::new(common::blksnap())
            .args(args)
            .env("BLKSNAP_CONTROL", &daemon.control)
            .current_dir("/")
            .uid(self.uid)
            .gid(self.gid)
            .output()
            .unwrap()
    }

    fn ok(&self, daemon: &Daemon, args: &[&str]) -> String {
        let out = self.cli(daemon, args);
        assert!(
            out.status.success(),
            "blksnap {args:?} as {} failed: {}\n{}",
            self.name,
            String::from_utf8_lossy(&out.stderr),
            daemon.log()
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Asserts the command fails with a message containing every needle.
    fn fails(&self, daemon: &Daemon, args: &[&str], needles: &[&str]) -> String {
        let out = self.cli(daemon, args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success(),
            "blksnap {args:?} as {} must fail: {}",
            self.name,
            String::from_utf8_lossy(&out.stdout)
        );
        for n in needles {
            assert!(
                stderr.contains(n),
                "blksnap {args:?}: {stderr:?} lacks {n:?}"
            );
        }
        stderr
    }

    fn chown(&self, path: &Path) {
        std::os::unix::fs::chown(path, Some(self.uid), Some(self.gid)).unwrap();
    }
}

impl Drop for User {
    fn drop(&mut self) {
        let _ = Command::new(which("userdel").unwrap())
            .arg(&self.name)
            .output();
        if let Some(groupdel) = which("groupdel") {
            let _ = Command::new(groupdel).arg(&self.name).output();
        }
    }
}

/// A loop device over a file, detached at drop.
struct Loop(String);

impl Loop {
    fn over(file: &Path) -> Self {
        let device = run_ok("losetup", &["-f", "--show", file.to_str().unwrap()]);
        Self(device.trim().to_string())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new(which("losetup").unwrap())
            .args(["-d", &self.0])
            .output();
    }
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A daemon whose control socket is open to `group`, in a directory the
/// group's members can traverse.
fn daemon_for(group: &str, work: &Path) -> Daemon {
    let config = work.join("blksnapd.toml");
    std::fs::write(&config, format!("control_group = \"{group}\"\n")).unwrap();
    let daemon = Daemon::start_with(&["--config", config.to_str().unwrap()]);
    chmod(daemon.dir.path(), 0o711);
    chmod(&daemon.dir.path().join("run"), 0o711);
    daemon
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn a_group_member_opens_only_what_it_could_open_itself() {
    if !ready("a_group_member_opens_only_what_it_could_open_itself") {
        return;
    }
    let user = User::new();
    let work = tempfile::tempdir().unwrap();
    chmod(work.path(), 0o711);
    let daemon = daemon_for(&user.name, work.path());
    let uid = format!("uid {}", user.uid);

    // Root's: an empty 0600 file (fine as storage, had root opened it), an
    // image, a directory, and a loop device (root:disk 0660).
    let secret = work.path().join("secret");
    File::create(&secret).unwrap();
    chmod(&secret, 0o600);
    let root_img = blksnap_test_support::sparse_file(work.path(), "root.img", 4 << 20);
    chmod(&root_img, 0o600);
    let root_dir = work.path().join("root-dir");
    std::fs::create_dir(&root_dir).unwrap();
    chmod(&root_dir, 0o755);
    let backing = blksnap_test_support::sparse_file(work.path(), "loop.img", 8 << 20);
    let lo = Loop::over(&backing);

    user.fails(
        &daemon,
        &["snapshot_create", "--file", s(&secret)],
        &[s(&secret), &uid, "may not open it read-write"],
    );
    user.fails(
        &daemon,
        &["snapshot_create", "--file", s(&root_dir)],
        &[s(&root_dir), &uid, "may not open it read-write"],
    );
    user.fails(
        &daemon,
        &["attach", "--device", s(&root_img)],
        &[s(&root_img), &uid, "may not open it read-write"],
    );
    let id = user.ok(&daemon, &["snapshot_create"]).trim().to_string();
    user.fails(
        &daemon,
        &[
            "snapshot_appendstorage",
            "--id",
            &id,
            "--device",
            &lo.0,
            "--range",
            "0:2048",
        ],
        &[&lo.0, &uid, "may not open it read-write"],
    );
    // Nothing was attached or appended, and the daemon goes on.
    let list = user.ok(&daemon, &["--json", "list"]);
    assert!(!list.contains("root.img"), "{list}");
    let info = daemon.raw(
        format!("{{\"command\":\"snapshot_info\",\"args\":{{\"id\":\"{id}\"}}}}\n").as_bytes(),
        1,
    );
    assert_eq!(info[0]["result"]["storage"]["total"], 0, "{info:?}");

    // The user's own files: attached, and as storage.
    let mine = blksnap_test_support::sparse_file(work.path(), "mine.img", 4 << 20);
    user.chown(&mine);
    chmod(&mine, 0o600);
    let storage = work.path().join("mine-storage");
    File::create(&storage).unwrap();
    user.chown(&storage);
    chmod(&storage, 0o600);
    user.ok(&daemon, &["attach", "--device", s(&mine)]);
    let with_file = user
        .ok(
            &daemon,
            &[
                "snapshot_create",
                "--device",
                "mine.img",
                "--file",
                s(&storage),
            ],
        )
        .trim()
        .to_string();
    user.ok(&daemon, &["snapshot_take", "--id", &with_file]);
    user.ok(&daemon, &["snapshot_destroy", "--id", &with_file]);

    // A directory of its own: the temporary file there is the user's.
    let dir = work.path().join("mine-dir");
    std::fs::create_dir(&dir).unwrap();
    user.chown(&dir);
    chmod(&dir, 0o700);
    let in_dir = user
        .ok(&daemon, &["snapshot_create", "--file", s(&dir)])
        .trim()
        .to_string();
    let tmpfile_owner = std::fs::read_dir(format!("/proc/{}/fd", daemon.pid()))
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            std::fs::read_link(e.path())
                .ok()?
                .starts_with(&dir)
                .then(|| std::fs::metadata(e.path()).ok())?
        })
        .map(|m| m.uid())
        .next();
    assert_eq!(
        tmpfile_owner,
        Some(user.uid),
        "the O_TMPFILE in {} belongs to the client",
        dir.display()
    );
    user.ok(&daemon, &["snapshot_destroy", "--id", &in_dir]);
    user.ok(&daemon, &["snapshot_destroy", "--id", &id]);
    user.ok(&daemon, &["detach", "--device", "mine.img"]);
    drop(daemon);
    drop(lo);
}

/// Holds a block device the way a mount does: `O_EXCL`.
fn hold_exclusively(device: &str) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(rustix::fs::OFlags::EXCL.bits() as i32)
        .open(device)
}

#[test]
fn storage_block_devices_are_exclusive_and_files_need_overwrite() {
    if !ready("storage_block_devices_are_exclusive_and_files_need_overwrite") {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let daemon = Daemon::start();
    let whole = Loop::over(&blksnap_test_support::sparse_file(
        work.path(),
        "whole.img",
        8 << 20,
    ));
    let ranges = Loop::over(&blksnap_test_support::sparse_file(
        work.path(),
        "ranges.img",
        8 << 20,
    ));

    // Held by another program: refused, naming the device.
    let held = hold_exclusively(&whole.0).unwrap();
    daemon.fails(
        &["snapshot_create", "--file", &whole.0],
        &[&whole.0, "busy"],
    );
    drop(held);
    let first = daemon
        .ok(&["snapshot_create", "--file", &whole.0])
        .trim()
        .to_string();
    assert_eq!(
        hold_exclusively(&whole.0).unwrap_err().raw_os_error(),
        Some(rustix::io::Errno::BUSY.raw_os_error()),
        "the storage device is held exclusively"
    );

    // Appended ranges too: refused while another holds the device, held
    // once appended; more ranges of it for the same snapshot are fine,
    // another snapshot may not have it.
    let held = hold_exclusively(&ranges.0).unwrap();
    let out = daemon.cli(&[
        "snapshot_appendstorage",
        "--id",
        &first,
        "--device",
        &ranges.0,
        "--range",
        "0:2048",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "appended while held elsewhere");
    assert!(
        stderr.contains(&ranges.0) && stderr.contains("busy"),
        "{stderr}"
    );
    drop(held);
    daemon.ok(&[
        "snapshot_appendstorage",
        "--id",
        &first,
        "--device",
        &ranges.0,
        "--range",
        "0:2048",
    ]);
    assert_eq!(
        hold_exclusively(&ranges.0).unwrap_err().raw_os_error(),
        Some(rustix::io::Errno::BUSY.raw_os_error()),
        "an appended storage device is held exclusively"
    );
    daemon.ok(&[
        "snapshot_appendstorage",
        "--id",
        &first,
        "--device",
        &ranges.0,
        "--range",
        "4096:2048",
    ]);
    let second = daemon.ok(&["snapshot_create"]).trim().to_string();
    daemon.fails(
        &[
            "snapshot_appendstorage",
            "--id",
            &second,
            "--device",
            &ranges.0,
            "--range",
            "8192:2048",
        ],
        &[&ranges.0, "busy", &first],
    );
    daemon.ok(&["snapshot_destroy", "--id", &first]);
    // Released with the snapshot.
    drop(hold_exclusively(&ranges.0).unwrap());
    drop(hold_exclusively(&whole.0).unwrap());

    // A storage file with content needs --overwrite; an empty one does not.
    let full = work.path().join("full");
    std::fs::write(&full, vec![0x5a; 1 << 20]).unwrap();
    daemon.fails(
        &["snapshot_create", "--file", s(&full)],
        &[s(&full), "--overwrite", "1048576 bytes"],
    );
    let overwritten = daemon
        .ok(&["snapshot_create", "--file", s(&full), "--overwrite"])
        .trim()
        .to_string();
    let empty = work.path().join("empty");
    File::create(&empty).unwrap();
    let in_empty = daemon
        .ok(&["snapshot_create", "--file", s(&empty)])
        .trim()
        .to_string();
    for id in [&overwritten, &in_empty, &second] {
        daemon.ok(&["snapshot_destroy", "--id", id]);
    }
    drop(daemon);
}
