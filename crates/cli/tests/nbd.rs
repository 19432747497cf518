//! The NBD frontend with stock clients, through a real blksnapd: qemu-img,
//! qemu-io, nbdinfo, nbdcopy and fio's nbd engine. The tools are installed by
//! `scripts/install-deps`; outside CI a missing tool skips its test loudly,
//! in CI (CI=true) it fails.

mod common;

use std::process::{Command, Output};
use std::thread;
use std::time::Duration;

use blksnap_test_support::Pattern;
use common::Daemon;

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;

fn have(tool: &str) -> bool {
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

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A device `name` of `size` random bytes (pattern `seed`) in the daemon's
/// directory, attached; returns its content.
fn random_device(d: &Daemon, name: &str, size: u64, seed: u64) -> Vec<u8> {
    let data = Pattern::Random.bytes(seed, size);
    std::fs::write(d.path(name), &data).unwrap();
    d.ok(&["attach", "--device", name]);
    data
}

/// `qemu-img compare` of two raw images (files or NBD URIs); `-q` when
/// `quiet`.
fn qemu_img_compare(quiet: bool, left: &str, right: &str) -> Command {
    let mut cmd = Command::new("qemu-img");
    cmd.arg("compare");
    if quiet {
        cmd.arg("-q");
    }
    cmd.args(["-f", "raw", "-F", "raw", left, right]);
    cmd
}

/// `nbdinfo --map` lines as (offset, length, type).
fn map(uri: &str, context: &str) -> Vec<(u64, u64, u32)> {
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

#[test]
fn qemu_img_convert_and_compare_an_image_with_the_pre_write_copy() {
    if !(have("qemu-img") && have("qemu-io")) {
        return;
    }
    let d = Daemon::start();
    let content = random_device(&d, "a.img", 16 * MIB, 1);
    std::fs::write(d.path("before.img"), content).unwrap();
    d.snapshot("a.img");
    let origin = d.uri("a.img");
    // Writes through the origin export, each read back.
    for (i, at) in [0, 300 * KIB, 5 * MIB + 512, 16 * MIB - 64 * KIB]
        .iter()
        .enumerate()
    {
        let pattern = 0x41 + i as u8;
        let out = run(Command::new("qemu-io").args([
            "-f",
            "raw",
            "-c",
            &format!("write -P {pattern} {at} 64k"),
            "-c",
            &format!("read -P {pattern} {at} 64k"),
            &origin,
        ]));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("wrote 65536/65536") && text.contains("read 65536/65536"),
            "{text}"
        );
        assert!(!text.contains("Pattern verification failed"), "{text}");
    }
    let image = d.uri("snapshot/a.img");
    run(Command::new("qemu-img").args([
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &image,
        d.path("out.img").to_str().unwrap(),
    ]));
    let before = d.path("before.img");
    let before = before.to_str().unwrap();
    run(&mut qemu_img_compare(
        false,
        before,
        d.path("out.img").to_str().unwrap(),
    ));
    run(&mut qemu_img_compare(false, before, &image));
    // ...and the origin really did change.
    let differ = qemu_img_compare(true, before, &origin).status().unwrap();
    assert_eq!(differ.code(), Some(1));
}

#[test]
fn nbdinfo_lists_exports_and_maps_allocation_and_changed_blocks() {
    if !(have("nbdinfo") && have("qemu-io")) {
        return;
    }
    let d = Daemon::start();
    // Sparse: data only at 3 MiB..4 MiB.
    let path = d.image("s.img", 16 * MIB);
    {
        use std::os::unix::fs::FileExt;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all_at(&[7u8; MIB as usize], 3 * MIB)
            .unwrap();
    }
    d.ok(&["attach", "--device", "s.img"]);
    assert_eq!(
        map(&d.uri("s.img"), "base:allocation"),
        [(0, 3 * MIB, 3), (3 * MIB, MIB, 0), (4 * MIB, 12 * MIB, 3)]
    );
    let first = d.snapshot("s.img");
    // Blocks changed after snapshot 1: tracking blocks are 64 KiB.
    let writes = [
        (8 * MIB, 4 * KIB),
        (8 * MIB + 60 * KIB, 8 * KIB),
        (15 * MIB, 1),
    ];
    for (at, len) in writes {
        run(Command::new("qemu-io").args([
            "-f",
            "raw",
            "-c",
            &format!("write -P 9 {at} {len}"),
            &d.uri("s.img"),
        ]));
    }
    d.ok(&["snapshot_destroy", "--id", &first]);
    let second = d.snapshot("s.img");
    let list = String::from_utf8(
        run(Command::new("nbdinfo").args([
            "--list",
            "--json",
            &format!("nbd+unix://?socket={}", d.nbd.display()),
        ]))
        .stdout,
    )
    .unwrap();
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    let exports: Vec<&str> = list["exports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["export-name"].as_str().unwrap())
        .collect();
    assert_eq!(exports, ["s.img", "snapshot/s.img"]);
    let image = list["exports"][1]["contexts"].as_array().unwrap();
    let contexts: Vec<&str> = image.iter().map(|c| c.as_str().unwrap()).collect();
    assert_eq!(
        contexts,
        [
            "base:allocation",
            "qemu:dirty-bitmap:since-0",
            "qemu:dirty-bitmap:since-1"
        ]
    );

    let uri = d.uri("snapshot/s.img");
    // since-1: exactly the tracking blocks written after snapshot 1.
    assert_eq!(
        map(&uri, "qemu:dirty-bitmap:since-1"),
        [
            (0, 8 * MIB, 0),
            (8 * MIB, 128 * KIB, 1),
            (8 * MIB + 128 * KIB, 7 * MIB - 128 * KIB, 0),
            (15 * MIB, 64 * KIB, 1),
            (15 * MIB + 64 * KIB, MIB - 64 * KIB, 0)
        ]
    );
    // since-0: everything changed since attach, i.e. the same here.
    assert_eq!(
        map(&uri, "qemu:dirty-bitmap:since-0"),
        map(&uri, "qemu:dirty-bitmap:since-1")
    );
    let allocation = map(&uri, "base:allocation");
    assert!(allocation.contains(&(3 * MIB, MIB, 0)), "{allocation:?}");
    // QEMU's own view through x-dirty-bitmap: dirty areas read as "data": false.
    if have("qemu-img") {
        let out = run(Command::new("qemu-img").args([
            "map",
            "--output=json",
            "--image-opts",
            &format!(
                "driver=nbd,server.type=unix,server.path={},export=snapshot/s.img,x-dirty-bitmap=qemu:dirty-bitmap:since-1",
                d.nbd.display()
            ),
        ]));
        let extents: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let dirty: Vec<(u64, u64)> = extents
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["data"] == false)
            .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
            .collect();
        assert_eq!(dirty, [(8 * MIB, 128 * KIB), (15 * MIB, 64 * KIB)]);
    }
    d.ok(&["snapshot_destroy", "--id", &second]);
}

#[test]
fn nbdcopy_with_several_connections() {
    if !(have("nbdcopy") && have("qemu-io")) {
        return;
    }
    let d = Daemon::start();
    let before = random_device(&d, "c.img", 32 * MIB, 2);
    d.snapshot("c.img");
    // Copy while writes hit the origin.
    let writer = {
        let origin = d.uri("c.img");
        thread::spawn(move || {
            for i in 0..16u64 {
                run(Command::new("qemu-io").args([
                    "-f",
                    "raw",
                    "-c",
                    &format!("write -P 3 {} 1m", i * 2 * MIB),
                    &origin,
                ]));
            }
        })
    };
    let out = d.path("copy.img");
    run(Command::new("nbdcopy").args([
        "--connections=4",
        "--requests=16",
        &d.uri("snapshot/c.img"),
        out.to_str().unwrap(),
    ]));
    writer.join().unwrap();
    assert!(
        std::fs::read(&out).unwrap() == before,
        "the copy differs from the content at the take"
    );
    run(Command::new("nbdcopy").args([
        "--connections=4",
        &d.uri("snapshot/c.img"),
        out.to_str().unwrap(),
    ]));
    assert!(std::fs::read(&out).unwrap() == before);
}

#[test]
fn fio_random_writes_verify_while_snapshots_are_taken_and_read() {
    if !(have("fio") && have("nbdcopy")) {
        return;
    }
    let d = Daemon::start();
    d.image("f.img", 64 * MIB);
    d.ok(&["attach", "--device", "f.img"]);
    let fio = Command::new("fio")
        .args([
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={}", d.uri("f.img")),
            "--rw=randwrite",
            "--bs=4k",
            "--size=64M",
            "--iodepth=16",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--loops=2",
        ])
        .output();
    let fio = thread::spawn(move || fio.unwrap());
    // Takes, image reads and destroys while fio writes.
    let mut rounds = 0;
    while !fio.is_finished() && rounds < 20 {
        let id = d.snapshot("f.img");
        let copy = d.path("image.copy");
        run(Command::new("nbdcopy").args([&d.uri("snapshot/f.img"), copy.to_str().unwrap()]));
        assert_eq!(
            d.ok(&[
                "snapshot_info",
                "--device",
                "f.img",
                "--field",
                "error_code"
            ]),
            "0\n"
        );
        d.ok(&["snapshot_destroy", "--id", &id]);
        rounds += 1;
        thread::sleep(Duration::from_millis(50));
    }
    let out = fio.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fio failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("err= 0"), "{text}");
    assert!(rounds >= 1, "no snapshot was taken while fio ran");
}
