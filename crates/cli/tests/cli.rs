//! The `blksnap` CLI against a real `blksnapd`: the whole command set with
//! exact output, `--json`, and the errors a user meets; after every error the
//! daemon still serves.

mod common;

use blksnap_test_support::changed_since;
use common::{create_args, Daemon};
use std::process::{Command, Stdio};

const MIB: u64 = 1 << 20;

fn lines(s: &str) -> Vec<&str> {
    s.lines().collect()
}

fn assert_alive(d: &Daemon) {
    assert_eq!(
        d.ok(&["version"]),
        format!("{}\n", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn whole_command_set() {
    let d = Daemon::start();
    let a = d.image("a.img", 8 * MIB);
    let b = d.image("b.img", 16 * MIB);
    let store = d.path("store");
    std::fs::create_dir(&store).unwrap();

    assert_eq!(d.ok(&["version"]), "0.1.0\n");
    let v: serde_json::Value = serde_json::from_str(&d.ok(&["version", "--json"])).unwrap();
    assert_eq!(v["protocol"], 1);

    // attach by relative path (resolved by the CLI), with and without a name
    assert_eq!(
        d.ok(&["attach", "--device", "a.img"]),
        format!(
            "Attached successfully\ndevice=a.img\nnbd={}\n",
            d.uri("a.img")
        )
    );
    assert_eq!(
        d.ok(&["attach", "--device", b.to_str().unwrap(), "--name", "bee"]),
        format!("Attached successfully\ndevice=bee\nnbd={}\n", d.uri("bee"))
    );

    let info = d.ok(&["cbtinfo", "--device", "a.img"]);
    let l = lines(&info);
    assert_eq!(l.len(), 6, "{info}");
    assert_eq!(l[0], "block_size=65536");
    assert_eq!(l[1], format!("device_capacity={}", 8 * MIB));
    assert_eq!(l[2], "block_count=128");
    let generation = l[3].strip_prefix("generation_id=").unwrap();
    assert_eq!(
        uuid::Uuid::parse_str(generation).unwrap().get_version_num(),
        4
    );
    assert_eq!(l[4], "changes_number=0");
    assert_eq!(l[5], "generation_reason=attached");
    // --device by absolute path, or through a symlink, is the same device
    std::os::unix::fs::symlink(&b, d.path("link.img")).unwrap();
    let by_link = d.ok(&["cbtinfo", "--device", "link.img", "--json"]);
    let j: serde_json::Value = serde_json::from_str(&by_link).unwrap();
    assert_eq!(
        (j["block_count"].as_u64(), j["changes_number"].as_u64()),
        (Some(256), Some(0))
    );

    let list = d.ok(&["list"]);
    assert_eq!(
        list,
        format!(
            "device=a.img size={} path={} snapshot=-\ndevice=bee size={} path={} snapshot=-\n",
            8 * MIB,
            a.display(),
            16 * MIB,
            b.display()
        )
    );

    // mark-dirty, then a snapshot of both with a directory storage
    assert_eq!(
        d.ok(&[
            "markdirtyblock",
            "--device",
            "a.img",
            "--range",
            "256:1",
            "--range",
            "2048:128"
        ]),
        ""
    );
    let id = d.ok(&[
        "snapshot_create",
        "--device",
        "a.img",
        "--device",
        "bee",
        "--file",
        "store",
        "--limit",
        "64M",
    ]);
    let id = id.trim().to_string();
    assert_eq!(uuid::Uuid::parse_str(&id).unwrap().to_string(), id);
    assert_eq!(d.ok(&["snapshot_collect"]), format!("{id} \n\n"));
    assert_eq!(d.ok(&["snapshot_take", "--id", &id]), "");
    let info = d.ok(&["snapshot_info", "--device", "bee"]);
    let (info, total) = info
        .strip_suffix('\n')
        .and_then(|i| i.rsplit_once("\nstorage_total="))
        .unwrap_or_else(|| panic!("no storage_total last: {info}"));
    assert_eq!(
        info,
        format!(
            "error_code=0\nimage=-\nid={id}\ntaken=true\ndevice=bee\nnbd={}\nchunk_size=262144\nstorage_used=0",
            d.uri("snapshot/bee")
        )
    );
    // Grown from the create on, in 16 MiB pieces up to the 64 MiB limit;
    // the take waited for the first.
    let total: u64 = total.parse().unwrap();
    assert!(
        (16 * MIB..=64 * MIB).contains(&total) && total % (16 * MIB) == 0,
        "storage_total={total}"
    );
    assert_eq!(
        d.ok(&[
            "snapshot_info",
            "--device",
            "a.img",
            "--field",
            "error_code"
        ]),
        "0\n"
    );
    let info: serde_json::Value =
        serde_json::from_str(&d.ok(&["snapshot_info", "--device", "a.img", "--json"])).unwrap();
    assert_eq!(info["storage"]["limit"], 64 * MIB);
    assert_eq!(info["images"].as_array().unwrap().len(), 2);
    assert!(d
        .ok(&["list"])
        .contains(&format!("snapshot={id} taken=true devices=a.img,bee")));

    // the readable map shows the marks, one byte per block
    let map_file = d.path("a.map");
    assert_eq!(
        d.ok(&[
            "readcbtmap",
            "--device",
            "a.img",
            "--file",
            map_file.to_str().unwrap()
        ]),
        ""
    );
    let map = std::fs::read(&map_file).unwrap();
    assert_eq!(map.len(), 128);
    assert_eq!(changed_since(&map, 0), [2, 16]);
    assert!(map.iter().all(|&v| v <= 1));
    let l = lines(&d.ok(&["cbtinfo", "--device", "a.img"]))
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>();
    assert_eq!(l[4], "changes_number=1");

    assert_eq!(
        d.ok(&["snapshot_waitevent", "--id", &id, "--timeout", "50"]),
        "result=timeout\n"
    );
    assert_eq!(
        d.ok(&[
            "snapshot_waitevent",
            "--id",
            &id,
            "--timeout",
            "10",
            "--json"
        ]),
        "{\"event\":null}\n"
    );

    // appended ranges after the take
    let extra = d.image("extra.bin", 4 * MIB);
    assert_eq!(
        d.ok(&[
            "snapshot_appendstorage",
            "--id",
            &id,
            "--device",
            extra.to_str().unwrap(),
            "--range",
            "0:2048",
            "--range",
            "4096:2048"
        ]),
        ""
    );
    let info: serde_json::Value =
        serde_json::from_str(&d.ok(&["snapshot_info", "--device", "a.img", "--json"])).unwrap();
    // The two ranges (2 MiB) on top of the directory's file, grown since
    // the create in 16 MiB pieces (one extent, or two when a piece came
    // after the append) up to the 64 MiB limit.
    let total = info["storage"]["total"].as_u64().unwrap();
    let grown = total - 2 * MIB;
    assert!(
        (16 * MIB..=64 * MIB).contains(&grown) && grown % (16 * MIB) == 0,
        "{info}"
    );
    let extents = info["storage"]["extents"].as_u64().unwrap();
    assert!((3..=4).contains(&extents), "{info}");

    // the watcher reports the destroy and exits 0
    let waits = d.log_lines(&["SnapshotWaitevent", &id]).len();
    let watcher = Command::new(env!("CARGO_BIN_EXE_blksnap"))
        .args(["snapshot_watcher", "--id", &id])
        .env("BLKSNAP_CONTROL", &d.control)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Handshake: the daemon has the watcher's wait before the destroy.
    d.wait_log_after(&["SnapshotWaitevent", &id], waits);
    assert_eq!(d.ok(&["snapshot_destroy", "--id", &id]), "");
    let out = watcher.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "Start snapshot watcher.\nSnapshot not found\nSnapshot watcher finished\n"
    );
    assert_eq!(d.ok(&["snapshot_collect"]), "\n");
    assert_eq!(d.ok(&["snapshot_collect", "--json"]), "{\"ids\":[]}\n");

    // a second snapshot: its storage a regular file (with a length, so
    // --overwrite); then detach everything
    let store_file = d.image("store.file", 4096);
    let id2 = d.ok(&[
        "snapshot_create",
        "--device",
        "a.img",
        "--file",
        store_file.to_str().unwrap(),
        "--limit",
        "1G",
        "--overwrite",
        "--json",
    ]);
    let id2: serde_json::Value = serde_json::from_str(&id2).unwrap();
    let id2 = id2["id"].as_str().unwrap().to_string();
    assert_eq!(d.ok(&["snapshot_add", "--id", &id2, "--device", "bee"]), "");
    assert_eq!(
        d.ok(&["snapshot_take", "--id", &id2, "--json"]),
        "{\"frozen\":[],\"warnings\":[]}\n"
    );
    assert_eq!(d.ok(&["snapshot_destroy", "--id", &id2]), "");
    assert_eq!(d.ok(&["detach", "--device", "a.img"]), "");
    assert_eq!(d.ok(&["detach", "--device", b.to_str().unwrap()]), "");
    assert_eq!(
        d.ok(&["list", "--json"]),
        "{\"devices\":[],\"snapshots\":[]}\n"
    );
}

#[test]
fn errors_name_the_problem_and_the_daemon_survives() {
    let d = Daemon::start();
    d.image("a.img", 4 * MIB);
    d.image("b.img", 4 * MIB);
    d.ok(&["attach", "--device", "a.img"]);
    d.ok(&["attach", "--device", "b.img"]);

    d.fails(
        &["cbtinfo", "--device", "nope"],
        &["nope", "not found", "ENOENT"],
    );
    assert_alive(&d);
    d.fails(
        &["attach", "--device", "missing.img"],
        &["missing.img", "No such file"],
    );
    // the same file again: not an error, as the original's
    assert_eq!(
        d.ok(&["attach", "--device", "a.img"]),
        format!(
            "Already was attached\ndevice=a.img\nnbd={}\n",
            d.uri("a.img")
        )
    );
    d.fails(
        &["attach", "--device", "b.img", "--name", "other"],
        &["b.img", "EEXIST"],
    );
    d.image("c.img", MIB);
    d.fails(
        &["attach", "--device", "c.img", "--name", "a.img"],
        &["named a.img", "EEXIST"],
    );
    assert_alive(&d);

    let s1 = d.create("a.img");
    let s1 = s1.as_str();
    let err = d.fails(&create_args("a.img"), &["a.img", "EBUSY"]);
    assert!(err.contains(s1), "{err}");
    let s2 = d.ok(&["snapshot_create", "--file", ".", "--limit", "1G"]);
    d.fails(
        &["snapshot_add", "--id", s2.trim(), "--device", "a.img"],
        &["a.img", s1, "EBUSY"],
    );
    d.fails(
        &["detach", "--device", "a.img"],
        &["a.img", s1, "destroy the snapshot first", "EBUSY"],
    );
    assert_alive(&d);

    // a bad limit is a usage error (status 1, as the original's) naming
    // the value
    let out = d.cli(&[
        "snapshot_create",
        "--device",
        "b.img",
        "--file",
        ".",
        "--limit",
        "12X",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid size \"12X\""));
    let out = d.cli(&["markdirtyblock", "--device", "b.img", "--range", "5:0"]);
    assert_eq!(out.status.code(), Some(1));
    d.fails(
        &[
            "snapshot_create",
            "--device",
            "b.img",
            "--file",
            "no/such/dir",
            "--limit",
            "1G",
        ],
        &["difference storage", "no/such/dir"],
    );
    d.fails(
        &["markdirtyblock", "--device", "b.img", "--range", "8192:1"],
        &["b.img", "outside the device", "EINVAL"],
    );

    let unknown = uuid::Uuid::new_v4().to_string();
    for cmd in ["snapshot_take", "snapshot_destroy", "snapshot_watcher"] {
        d.fails(&[cmd, "--id", &unknown], &[&unknown, "not found", "ENOENT"]);
    }
    // the original's answer for an unknown snapshot: a result line
    assert_eq!(
        d.ok(&["snapshot_waitevent", "--id", &unknown, "--timeout", "10"]),
        "result=not found\n"
    );
    d.fails(
        &["snapshot_info", "--device", "b.img"],
        &["b.img", "in no snapshot", "ENOENT"],
    );
    d.fails(
        &["snapshot_info", "--device", "a.img", "--field", "image"],
        &["not taken"],
    );
    d.ok(&["snapshot_take", "--id", s1]);
    d.fails(&["snapshot_take", "--id", s1], &["already taken", "EPERM"]);
    // No loop device: the image field is the NBD URI.
    assert_eq!(
        d.ok(&["snapshot_info", "--device", "a.img", "--field", "image"]),
        format!("{}\n", d.uri("snapshot/a.img"))
    );
    assert_eq!(
        d.ok(&["snapshot_info", "--device", "a.img", "--field", "nbd"]),
        format!("{}\n", d.uri("snapshot/a.img"))
    );
    assert_alive(&d);

    // without a daemon: a clear message
    let out = Command::new(env!("CARGO_BIN_EXE_blksnap"))
        .args(["--control", "/nonexistent/ctl.sock", "version"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("cannot connect to blksnapd at /nonexistent/ctl.sock"));
}

#[test]
fn malformed_requests_get_error_replies() {
    let d = Daemon::start();
    let replies = d.raw(
        b"this is not json\n{\"id\":4,\"command\":\"bogus\"}\n{\"id\":5,\"command\":\"attach\",\"args\":{\"device\":\"relative\"}}\n{\"id\":6,\"command\":\"attach\",\"args\":{\"devise\":\"/x\"}}\n\xff\xfe\n{\"id\":7,\"command\":\"version\"}\n",
        6,
    );
    for r in &replies[..5] {
        assert_eq!(r["ok"], false, "{r}");
        assert_eq!(r["error"]["errno"], 22, "{r}");
        assert_eq!(r["error"]["name"], "EINVAL", "{r}");
    }
    assert!(replies[0]["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("malformed request"));
    assert_eq!(replies[1]["id"], 4);
    assert!(replies[1]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("bogus"));
    assert!(replies[2]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("must be absolute"));
    assert!(replies[3]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("devise"));
    assert_eq!(replies[5]["id"], 7);
    assert_eq!(replies[5]["ok"], true);
    assert_eq!(replies[5]["result"]["protocol"], 1);

    // a relative device path would mean the daemon's directory: refused
    let r = d.raw(
        b"{\"command\":\"cbtinfo\",\"args\":{\"device\":\"rel/a.img\"}}\n",
        1,
    );
    assert_eq!(r[0]["error"]["name"], "EINVAL");
    assert!(r[0]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("absolute"));

    // an oversized request: an error reply, and the connection goes on
    let mut big = vec![b'x'; 2 << 20];
    big.push(b'\n');
    big.extend_from_slice(b"{\"command\":\"snapshot_collect\"}\n");
    let replies = d.raw(&big, 2);
    assert!(replies[0]["error"]["message"]
        .as_str()
        .unwrap()
        .contains("too large"));
    assert_eq!(replies[1]["result"]["ids"], serde_json::json!([]));

    // a client that vanishes mid-request harms nobody
    {
        use std::io::Write;
        let mut s = std::os::unix::net::UnixStream::connect(&d.control).unwrap();
        s.write_all(b"{\"command\":\"vers").unwrap();
    }
    assert_alive(&d);
}

#[test]
fn help_on_every_command() {
    let d = Daemon::start();
    let out = d.ok(&["help"]);
    for cmd in [
        "version",
        "attach",
        "detach",
        "list",
        "cbtinfo",
        "readcbtmap",
        "markdirtyblock",
        "snapshot_create",
        "snapshot_add",
        "snapshot_appendstorage",
        "snapshot_take",
        "snapshot_destroy",
        "snapshot_collect",
        "snapshot_info",
        "snapshot_waitevent",
        "snapshot_watcher",
    ] {
        assert!(out.contains(cmd), "help lacks {cmd}");
        let help = d.ok(&[cmd, "--help"]);
        assert!(
            help.contains("--json") && help.contains("--control"),
            "{cmd} --help: {help}"
        );
    }
    assert!(d.ok(&["snapshot_create", "--help"]).contains("--limit"));
}
