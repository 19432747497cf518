//! The original blksnap tool's spellings and outputs (docs/blksnap.md,
//! "Compatibility"): every short option and alias does what its long form
//! does, `--device a b` is `--device a --device b`, every failure exits 1,
//! and `attach`, `snapshot_waitevent`, `snapshot_watcher` and
//! `snapshot_collect` print the original's lines. Each spelling is checked
//! against the long form's effect through another command, not against
//! text this tool made up.

mod common;

use common::Daemon;
use serde_json::Value;
use std::process::{Command, Stdio};

const MIB: u64 = 1 << 20;

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text:?}"))
}

/// Two daemons, one driven by the long spellings and one by the original's
/// short ones, with the same two image files each.
fn pair() -> (Daemon, Daemon) {
    let (long, short) = (Daemon::start(), Daemon::start());
    for d in [&long, &short] {
        d.image("a.img", 8 * MIB);
        d.image("b.img", 8 * MIB);
        d.image("extra.bin", 4 * MIB);
    }
    (long, short)
}

/// The devices of the snapshot `a.img` is in, and its storage size.
fn snapshot_of_a(d: &Daemon) -> (Vec<String>, u64) {
    let info = json(&d.ok(&["snapshot_info", "--device", "a.img", "--json"]));
    let mut devices: Vec<String> = info["images"]
        .as_array()
        .map(|images| {
            images
                .iter()
                .map(|i| i["device"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default();
    if devices.is_empty() {
        devices = json(&d.ok(&["list", "--json"]))["snapshots"][0]["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
    }
    devices.sort();
    (devices, info["storage"]["total"].as_u64().unwrap())
}

/// The readable change map of `device`, through `readcbtmap`.
fn map(d: &Daemon, args: &[&str]) -> Vec<u8> {
    assert_eq!(d.ok(args), "");
    std::fs::read(d.path("map")).unwrap()
}

#[test]
fn short_options_and_aliases_do_what_the_long_ones_do() {
    let (long, short) = pair();

    // version: -j is --json
    assert_eq!(
        long.ok(&["version", "--json"]),
        short.ok(&["version", "-j"])
    );
    let v = json(&short.ok(&["version", "-j"]));
    assert!(v["protocol"].is_u64(), "{v}");

    // attach -d
    let names = |d: &Daemon| {
        json(&d.ok(&["list", "--json"]))["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|dev| dev["name"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    for name in ["a.img", "b.img"] {
        let out = long.ok(&["attach", "--device", name]);
        assert_eq!(
            out,
            short
                .ok(&["attach", "-d", name])
                .replace(&short.uri(name), &long.uri(name))
        );
        assert_eq!(out.lines().next(), Some("Attached successfully"), "{out}");
    }
    assert_eq!(names(&long), names(&short));
    assert_eq!(names(&short), ["a.img", "b.img"]);

    // cbtinfo -d, -j: the same fields (the generation ids differ)
    let cbt = |d: &Daemon, args: &[&str]| {
        let mut v = json(&d.ok(args));
        v.as_object_mut().unwrap().remove("generation_id");
        v
    };
    assert_eq!(
        cbt(&long, &["cbtinfo", "--device", "a.img", "--json"]),
        cbt(&short, &["cbtinfo", "-d", "a.img", "-j"])
    );

    // markdirtyblock -d, -r, --ranges, several ranges after one flag: the
    // same marks as --range repeated
    long.ok(&[
        "markdirtyblock",
        "--device",
        "a.img",
        "--range",
        "0:1",
        "--range",
        "2048:256",
        "--range",
        "9000:8",
    ]);
    short.ok(&["markdirtyblock", "-d", "a.img", "-r", "0:1", "2048:256"]);
    short.ok(&["markdirtyblock", "-d", "a.img", "--ranges", "9000:8"]);

    // snapshot_create -d a b -f -l; snapshot_appendstorage -i -d -r
    let long_id = long
        .ok(&[
            "snapshot_create",
            "--device",
            "a.img",
            "--device",
            "b.img",
            "--file",
            ".",
            "--limit",
            "64M",
        ])
        .trim()
        .to_string();
    let short_id = short
        .ok(&[
            "snapshot_create",
            "-d",
            "a.img",
            "b.img",
            "-f",
            ".",
            "-l",
            "64M",
        ])
        .trim()
        .to_string();
    let limit = |d: &Daemon| {
        json(&d.ok(&["snapshot_info", "-d", "a.img", "-j"]))["storage"]["limit"].clone()
    };
    assert_eq!(limit(&long), limit(&short));
    assert_eq!(limit(&short), 64 * MIB);
    long.ok(&[
        "snapshot_appendstorage",
        "--id",
        &long_id,
        "--device",
        "extra.bin",
        "--range",
        "0:2048",
    ]);
    short.ok(&[
        "snapshot_appendstorage",
        "-i",
        &short_id,
        "-d",
        "extra.bin",
        "-r",
        "0:2048",
    ]);
    // The same devices and the appended MiB on both; the directory's file
    // grows in the background from the create on, in 16 MiB pieces up to
    // the limit, so each holds some of those besides.
    for d in [&long, &short] {
        let (devices, total) = snapshot_of_a(d);
        assert_eq!(devices, ["a.img", "b.img"]);
        assert!(
            total % (16 * MIB) == MIB && total <= 65 * MIB,
            "storage total {total}"
        );
    }

    // snapshot_take -i, snapshot_info -d -f, snapshot_waitevent -i -t
    long.ok(&["snapshot_take", "--id", &long_id]);
    short.ok(&["snapshot_take", "-i", &short_id]);
    // readcbtmap -d -f: the marks, in the map copied at the take
    let long_map = map(&long, &["readcbtmap", "--device", "a.img", "--file", "map"]);
    let short_map = map(&short, &["readcbtmap", "-d", "a.img", "-f", "map"]);
    assert_eq!(long_map, short_map);
    assert_eq!(long_map.iter().filter(|&&b| b != 0).count(), 4);
    let taken = |d: &Daemon| json(&d.ok(&["snapshot_info", "-d", "b.img", "-j"]))["taken"].clone();
    assert_eq!(taken(&short), true);
    assert_eq!(
        long.ok(&[
            "snapshot_info",
            "--device",
            "a.img",
            "--field",
            "error_code"
        ]),
        short.ok(&["snapshot_info", "-d", "a.img", "-f", "error_code"])
    );
    assert_eq!(
        long.ok(&["snapshot_waitevent", "--id", &long_id, "--timeout", "20"]),
        short.ok(&["snapshot_waitevent", "-i", &short_id, "-t", "20"])
    );

    // snapshot_destroy -i, then a second snapshot by snapshot_add -i -d
    long.ok(&["snapshot_destroy", "--id", &long_id]);
    short.ok(&["snapshot_destroy", "-i", &short_id]);
    assert_eq!(short.ok(&["snapshot_collect"]).trim(), "");
    let id = short.ok(&["snapshot_create", "-f", ".", "-l", "1G"]);
    short.ok(&["snapshot_add", "-i", id.trim(), "-d", "a.img"]);
    assert_eq!(snapshot_of_a(&short).0, ["a.img"]);
    short.ok(&["snapshot_destroy", "-i", id.trim()]);

    // detach -d
    long.ok(&["detach", "--device", "a.img"]);
    short.ok(&["detach", "-d", "a.img"]);
    assert_eq!(
        long.ok(&["list"]),
        short.ok(&["list"]).replace(
            &short.dir.path().display().to_string(),
            &long.dir.path().display().to_string()
        )
    );
}

#[test]
fn several_devices_after_one_flag_is_the_flag_repeated() {
    let d = Daemon::start();
    for name in ["a.img", "b.img", "c.img"] {
        d.image(name, 4 * MIB);
        d.ok(&["attach", "--device", name]);
    }
    let devices = |id: &str| {
        let list = json(&d.ok(&["list", "--json"]));
        let snapshot = list["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["id"] == id)
            .unwrap()
            .clone();
        let mut names: Vec<String> = snapshot["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        names.sort();
        names
    };
    let both = d.ok(&[
        "snapshot_create",
        "--device",
        "a.img",
        "b.img",
        "--file",
        ".",
        "--limit",
        "1G",
    ]);
    assert_eq!(devices(both.trim()), ["a.img", "b.img"]);
    d.ok(&["snapshot_destroy", "--id", both.trim()]);
    // mixed: several after one flag, and the flag again
    let all = d.ok(&[
        "snapshot_create",
        "--device",
        "a.img",
        "b.img",
        "-d",
        "c.img",
        "--file",
        ".",
        "--limit",
        "1G",
    ]);
    assert_eq!(devices(all.trim()), ["a.img", "b.img", "c.img"]);
}

#[test]
fn every_failure_exits_1_help_and_version_exit_0() {
    let d = Daemon::start();
    d.image("a.img", 4 * MIB);
    d.ok(&["attach", "--device", "a.img"]);
    let status = |args: &[&str]| d.cli(args).status.code();
    // usage errors: unknown command, unknown option, missing option, bad
    // value, no command at all
    for args in [
        &["bogus"][..],
        &["attach", "--devise", "a.img"],
        &["cbtinfo"],
        &["snapshot_waitevent", "-i", "not-a-uuid", "-t", "10"],
        &["snapshot_create", "-d", "a.img", "-f", ".", "-l", "12X"],
        &[],
    ] {
        assert_eq!(status(args), Some(1), "blksnap {args:?}");
    }
    // failures the daemon reports
    d.fails(&["cbtinfo", "-d", "nope"], &["nope", "ENOENT"]);
    d.fails(
        &["snapshot_take", "-i", &uuid::Uuid::new_v4().to_string()],
        &["ENOENT"],
    );
    // asked-for help and version: a success, printed on stdout
    for args in [
        &["--help"][..],
        &["-h"],
        &["help"],
        &["attach", "-h"],
        &["--version"],
    ] {
        let out = d.cli(args);
        assert_eq!(out.status.code(), Some(0), "blksnap {args:?}");
        assert!(!out.stdout.is_empty(), "blksnap {args:?}");
    }
}

#[test]
fn attach_twice_is_already_attached() {
    let d = Daemon::start();
    d.image("a.img", 4 * MIB);
    let first = d.ok(&["attach", "--device", "a.img"]);
    assert_eq!(first.lines().next(), Some("Attached successfully"));
    // the same file, by another path: the original's line, status 0, and
    // the same device
    let again = d.ok(&["attach", "-d", d.path("a.img").to_str().unwrap()]);
    assert_eq!(again.lines().next(), Some("Already was attached"));
    assert_eq!(
        first.lines().skip(1).collect::<Vec<_>>(),
        again.lines().skip(1).collect::<Vec<_>>()
    );
    let list = json(&d.ok(&["list", "--json"]));
    assert_eq!(list["devices"].as_array().unwrap().len(), 1, "{list}");
    // the change map was not restarted
    let generation =
        |d: &Daemon| json(&d.ok(&["cbtinfo", "-d", "a.img", "-j"]))["generation_id"].clone();
    let before = generation(&d);
    d.ok(&["attach", "--device", "a.img"]);
    assert_eq!(generation(&d), before);
    // another device under that name is still an error
    d.image("b.img", 4 * MIB);
    d.fails(
        &["attach", "--device", "b.img", "--name", "a.img"],
        &["EEXIST"],
    );
    // and so is the same file under another name than the one it has
    d.fails(
        &["attach", "--device", "a.img", "--name", "other"],
        &["EEXIST"],
    );
}

#[test]
fn waitevent_prints_the_original_result_lines() {
    let d = Daemon::start();
    d.image("a.img", 4 * MIB);
    d.ok(&["attach", "--device", "a.img"]);
    let id = d.snapshot("a.img");
    let started = std::time::Instant::now();
    assert_eq!(
        d.ok(&["snapshot_waitevent", "-i", &id, "-t", "300"]),
        "result=timeout\n"
    );
    assert!(started.elapsed() >= std::time::Duration::from_millis(300));
    assert_eq!(
        d.ok(&[
            "snapshot_waitevent",
            "--id",
            &uuid::Uuid::new_v4().to_string(),
            "--timeout",
            "10"
        ]),
        "result=not found\n"
    );
}

#[test]
fn watcher_on_destroy_prints_the_original_lines_and_exits_0() {
    let d = Daemon::start();
    d.image("a.img", 4 * MIB);
    d.ok(&["attach", "--device", "a.img"]);
    let id = d.snapshot("a.img");
    let waits = d.log_lines(&["SnapshotWaitevent", &id]).len();
    let watcher = Command::new(common::blksnap())
        .args(["snapshot_watcher", "-i", &id])
        .env("BLKSNAP_CONTROL", &d.control)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    d.wait_log_after(&["SnapshotWaitevent", &id], waits);
    d.ok(&["snapshot_destroy", "-i", &id]);
    let out = watcher.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "Start snapshot watcher.\nSnapshot not found\nSnapshot watcher finished\n"
    );
    assert!(out.stderr.is_empty());
}

#[test]
fn collect_prints_the_original_lines() {
    let d = Daemon::start();
    assert_eq!(d.ok(&["snapshot_collect"]), "\n");
    let mut ids = Vec::new();
    for name in ["a.img", "b.img"] {
        d.image(name, 4 * MIB);
        d.ok(&["attach", "--device", name]);
        ids.push(d.create(name));
    }
    let text = d.ok(&["snapshot_collect"]);
    // one line per id, each followed by a space, then an empty line
    let lines: Vec<&str> = text.split('\n').collect();
    assert_eq!(lines.len(), ids.len() + 2, "{text:?}");
    assert_eq!(lines[ids.len()..], ["", ""], "{text:?}");
    let mut listed: Vec<String> = lines[..ids.len()]
        .iter()
        .map(|l| {
            l.strip_suffix(' ')
                .unwrap_or_else(|| panic!("{l:?}"))
                .to_string()
        })
        .collect();
    let mut from_json: Vec<String> = json(&d.ok(&["snapshot_collect", "-j"]))["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    listed.sort();
    from_json.sort();
    ids.sort();
    assert_eq!(listed, from_json);
    assert_eq!(listed, ids);
    // a script's `for id in $(blksnap snapshot_collect)` sees just the ids
    assert_eq!(text.split_whitespace().count(), ids.len());
}

#[test]
fn markdirtyblock_file_without_device_names_what_is_missing() {
    // A file on no attached device (the test's own filesystem): the
    // original would mark its block device; ours says which device it is
    // and how to make it one we track. The root test `local.rs`
    // cbt_map_and_markdirtyblock_file marks a file found this way.
    let d = Daemon::start();
    d.image("a.img", 8 * MIB);
    d.ok(&["attach", "--device", "a.img"]);
    let file = d.path("data.bin");
    std::fs::write(&file, vec![7u8; 64 << 10]).unwrap();
    let out = d.fails(
        &["markdirtyblock", "--file", file.to_str().unwrap()],
        &["data.bin", "which is no attached device", "--device"],
    );
    assert!(!out.contains("allocate range"), "{out}");
}

#[test]
fn snapshot_create_and_add_attach_what_is_not_attached() {
    let d = Daemon::start();
    for name in ["a.img", "b.img", "c.img"] {
        d.image(name, 8 * MIB);
    }
    let names = |d: &Daemon| -> Vec<String> {
        let list = json(&d.ok(&["list", "--json"]));
        let mut names: Vec<String> = list["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["name"].as_str().unwrap().to_string())
            .collect();
        names.sort();
        names
    };
    // All or nothing: a create naming a missing file attaches nothing.
    d.fails(
        &["snapshot_create", "-d", "a.img", "missing.img", "-f", "."],
        &["missing.img"],
    );
    assert!(names(&d).is_empty(), "{:?}", names(&d));
    assert_eq!(d.ok(&["snapshot_collect"]), "\n");

    let id = d.ok(&["snapshot_create", "-d", "a.img", "-f", "."]);
    let id = id.trim();
    assert_eq!(names(&d), ["a.img"]);
    d.ok(&["snapshot_add", "-i", id, "-d", "b.img"]);
    assert_eq!(names(&d), ["a.img", "b.img"]);
    // Tracking started at the attach: a cbtinfo of each answers.
    for name in ["a.img", "b.img"] {
        d.ok(&["cbtinfo", "-d", name]);
    }
    d.ok(&["snapshot_take", "-i", id]);
    let (devices, _) = snapshot_of_a(&d);
    assert_eq!(devices, ["a.img", "b.img"]);
    // Adding to a taken snapshot fails, and leaves c.img not attached.
    d.fails(&["snapshot_add", "-i", id, "-d", "c.img"], &["taken"]);
    assert_eq!(names(&d), ["a.img", "b.img"]);
    d.ok(&["snapshot_destroy", "-i", id]);
    // A name (not a path) is still looked up, not attached.
    d.fails(
        &["snapshot_create", "-d", "nothing-by-this-name", "-f", "."],
        &["ENOENT"],
    );
}
