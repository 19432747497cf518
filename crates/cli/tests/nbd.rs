//! The NBD frontend with stock clients, through a real blksnapd: qemu-img,
//! qemu-io, nbdinfo, nbdcopy and fio's nbd engine; qemu with extended
//! headers, libnbd (1.14) with compact ones. The tools are installed by
//! `scripts/install-deps`; outside CI a missing tool skips its test loudly,
//! in CI (CI=true) it fails.

mod common;

use std::process::Command;
use std::thread;
use std::time::Duration;

use common::nbd_tools::{have, map, random_device, read_all, run};
use common::Daemon;

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;
const GIB: u64 = 1 << 30;

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

/// `qemu-img map --output=json` of `image_opts` as (start, length, data).
fn qemu_img_map(image_opts: &str) -> Vec<(u64, u64, bool)> {
    let out =
        run(Command::new("qemu-img").args(["map", "--output=json", "--image-opts", image_opts]));
    let extents: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    extents
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let n = |key: &str| e[key].as_u64().unwrap();
            (n("start"), n("length"), e["data"] == true)
        })
        .collect()
}

/// qemu (8.2 and later) negotiates extended headers with the server and
/// libnbd 1.14 (nbdinfo, nbdcopy) does not: the daemon's debug log says,
/// for each connection, which it got (docs/nbd.md, "Extended headers").
/// Through extended headers, on a sparse 6 GiB device, qemu-io writes past
/// 4 GiB and reads back and zeroes 5 GiB in one WRITE_ZEROES; qemu-img map
/// then sees the same allocation, and on the image the same dirty bitmap
/// (one dirty extent of more than 4 GiB), as nbdinfo through compact
/// headers.
#[test]
fn qemu_uses_extended_headers_and_libnbd_compact_ones() {
    if !(have("qemu-io") && have("qemu-img") && have("nbdinfo")) {
        return;
    }
    let d = Daemon::start();
    let size = 6 * GIB;
    d.image("big.img", size);
    d.ok(&["attach", "--device", "big.img"]);
    let entered = |extended: bool| {
        let mode = format!("extended={extended}");
        d.log_lines(&["NBD client in transmission", &mode]).len()
    };
    // Runs `tool`, then asserts that the connections it opened entered
    // transmission with extended headers (`extended`) or without, and
    // none the other way.
    let served = |extended: bool, tool: &mut dyn FnMut()| {
        let (mine, other) = (entered(extended), entered(!extended));
        tool();
        let mode = format!("extended={extended}");
        d.wait_log_after(&["NBD client in transmission", &mode], mine);
        assert_eq!(entered(!extended), other, "{}", d.log());
    };

    let (tail, tail_len) = (5 * GIB, 64 * KIB);
    served(true, &mut || {
        let out = run(Command::new("qemu-io").args([
            "-f",
            "raw",
            "-c",
            &format!("write -P 0x5a {tail} {tail_len}"),
            "-c",
            &format!("read -P 0x5a {tail} {tail_len}"),
            // -n (no slow fallback): qemu-io's way to zero over 2 GiB at
            // once; -u lets the server punch.
            "-c",
            &format!("write -z -u -n 0 {tail}"),
            "-c",
            &format!("read -P 0 {} 64k", 4 * GIB),
            "-c",
            &format!("read -P 0x5a {tail} {tail_len}"),
            &d.uri("big.img"),
        ]));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(&format!("wrote {tail}/{tail}")), "{text}");
        assert_eq!(text.matches("read 65536/65536").count(), 3, "{text}");
        assert!(!text.contains("failed"), "{text}");
    });
    // The 5 GiB of zeroes were one request.
    d.wait_log(&["NBD connection done", "WRITE_ZEROES=1"]);

    let opts = |export: &str, extra: &str| {
        format!(
            "driver=nbd,server.type=unix,server.path={},export={export}{extra}",
            d.nbd.display()
        )
    };
    // The same allocation through both, wherever the filesystem put it.
    let mut qemu = Vec::new();
    served(true, &mut || qemu = qemu_img_map(&opts("big.img", "")));
    let mut libnbd = Vec::new();
    served(false, &mut || {
        libnbd = map(&d.uri("big.img"), "base:allocation")
    });
    let libnbd: Vec<(u64, u64, bool)> = libnbd
        .into_iter()
        .map(|(at, len, kind)| (at, len, kind & 1 == 0))
        .collect();
    assert_eq!(merged(qemu), merged(libnbd));

    // The image's dirty bitmap: the zeroed range and the write after it
    // are one dirty extent (qemu shows dirty as "data": false).
    d.snapshot("big.img");
    let since0 = ",x-dirty-bitmap=qemu:dirty-bitmap:since-0";
    let mut qemu = Vec::new();
    served(true, &mut || {
        qemu = qemu_img_map(&opts("snapshot/big.img", since0))
    });
    let mut libnbd = Vec::new();
    served(false, &mut || {
        libnbd = map(&d.uri("snapshot/big.img"), "qemu:dirty-bitmap:since-0")
    });
    let libnbd: Vec<(u64, u64, bool)> = libnbd
        .into_iter()
        .map(|(at, len, kind)| (at, len, kind == 0))
        .collect();
    let qemu = merged(qemu);
    assert_eq!(qemu, merged(libnbd));
    assert!(
        matches!(qemu[..], [(0, dirty, false), (_, _, true)] if dirty >= tail + tail_len && dirty < size),
        "{qemu:?}"
    );
}

/// Extents with alike neighbours merged (each tool splits them its way).
fn merged(extents: Vec<(u64, u64, bool)>) -> Vec<(u64, u64, bool)> {
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    for (at, len, data) in extents {
        match out.last_mut() {
            Some(last) if last.2 == data && last.0 + last.1 == at => last.1 += len,
            _ => out.push((at, len, data)),
        }
    }
    out
}

/// A child process killed (and reaped) when dropped, unless taken.
struct KillOnDrop(Option<std::process::Child>);

impl KillOnDrop {
    fn child(&mut self) -> &mut std::process::Child {
        self.0.as_mut().unwrap()
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// fio (nbd engine, `verify=crc32c` with `verify_backlog`, rate-limited so
/// it writes for seconds) writes the first 24 MiB of a 32 MiB device while
/// snapshots are taken, read and destroyed. Each round checks that the
/// image is frozen at its take:
/// - fio's region: the image is copied twice, before and after a pause in
///   which fio goes on writing; both copies must be identical. The device's
///   own content after the second copy must differ from the first copy in
///   at least some rounds: proof that fio really wrote under the snapshot
///   (counted; at least 2 such rounds are required).
/// - the last 8 MiB, a region the test writes itself: filled with the
///   round's pattern (acknowledged) before the take, partly overwritten
///   after it; the image must hold the round's pattern there, whole.
///
/// fio's verify, which reads back everything it wrote through the device,
/// must pass.
#[test]
fn fio_random_writes_verify_while_snapshots_are_taken_and_read() {
    if !(have("fio") && have("nbdcopy") && have("qemu-io")) {
        return;
    }
    const FIO_END: usize = 24 * MIB as usize;
    let d = Daemon::start();
    d.image("f.img", 32 * MIB);
    d.ok(&["attach", "--device", "f.img"]);
    let out = std::fs::File::create(d.path("fio.out")).unwrap();
    let fio = Command::new("fio")
        .args([
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={}", d.uri("f.img")),
            "--rw=randwrite",
            "--bs=4k",
            "--size=24M",
            "--iodepth=16",
            // 6144 writes at 400 a second: about 15 s of writing, room for
            // several rounds even on a loaded machine.
            "--rate_iops=400",
            "--verify=crc32c",
            "--verify_backlog=512",
            "--verify_fatal=1",
            "--verify_state_save=0",
        ])
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    // A failed assertion must not leave fio writing (and burning CPU) on.
    let mut fio = KillOnDrop(Some(fio));
    let copy = |uri: &str| -> Vec<u8> {
        let data = read_all(&d, uri);
        assert_eq!(data.len() as u64, 32 * MIB);
        data
    };
    // One qemu-io (one connection) for several writes, each acknowledged.
    let write = |writes: &[(u8, u64, u64)]| {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "raw"]);
        for (pattern, at, len) in writes {
            cmd.args(["-c", &format!("write -P {pattern} {at} {len}")]);
        }
        let out = run(cmd.arg(d.uri("f.img")));
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(text.matches("wrote ").count(), writes.len(), "{text}");
    };
    let (mut rounds, mut overlapped) = (0, 0);
    while fio.child().try_wait().unwrap().is_none() && rounds < 40 {
        let before = 1 + (rounds % 100) as u8;
        write(&[(before, FIO_END as u64, 8 * MIB)]);
        let id = d.snapshot("f.img");
        // After the take: 4 KiB in every other 256 KiB chunk of the region.
        let after: Vec<_> = (0..32)
            .step_by(2)
            .map(|k| {
                (
                    before + 100,
                    FIO_END as u64 + k * 256 * KIB + 4 * KIB,
                    4 * KIB,
                )
            })
            .collect();
        write(&after);
        let image = d.uri("snapshot/f.img");
        let first = copy(&image);
        thread::sleep(Duration::from_millis(150));
        let second = copy(&image);
        assert!(
            first[..FIO_END] == second[..FIO_END],
            "round {rounds}: the image changed after its take while fio wrote"
        );
        assert!(
            second[FIO_END..].iter().all(|&b| b == before),
            "round {rounds}: the image lacks the region as acknowledged before the take"
        );
        let device = copy(&d.uri("f.img"));
        if device[..FIO_END] != first[..FIO_END] {
            overlapped += 1;
        }
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
    }
    let status = fio.0.take().unwrap().wait().unwrap();
    let text = std::fs::read_to_string(d.path("fio.out")).unwrap();
    assert!(status.success(), "fio failed: {text}");
    assert!(text.contains("err= 0"), "{text}");
    assert!(
        overlapped >= 2,
        "only {overlapped} of {rounds} rounds saw fio write under the snapshot: {text}"
    );
}

/// Bytes of `file` in the page cache (util-linux `fincore`).
fn resident_bytes(file: &std::path::Path) -> u64 {
    let out = run(Command::new("fincore")
        .args(["--bytes", "--noheadings", "--output", "RES"])
        .arg(file));
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// qemu-io commands on `uri`; asserts that every pattern read back matched.
fn qemu_io(uri: &str, commands: &[&str]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    let out = run(cmd.arg(uri));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        !text.contains("Pattern verification failed"),
        "{commands:?}: {text}"
    );
    text
}

/// `origin_cache = "none"`: the origin is read and written around the page
/// cache (none of its pages is cached after writes, reads, a snapshot's
/// copies and image reads through the daemon; with the default, they are),
/// and every byte still lands where it should, unaligned writes (through
/// the page cache) included.
#[test]
fn origin_cache_none_reads_and_writes_around_the_page_cache() {
    if !(have("qemu-io") && have("fincore") && have("fallocate")) {
        return;
    }
    for (cache, bypassed) in [("none", true), ("writeback", false)] {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("blksnapd.toml");
        std::fs::write(&config, format!("origin_cache = \"{cache}\"\n")).unwrap();
        let d = Daemon::start_in(dir, &["--config", config.to_str().unwrap()]);
        // Allocated, never written: nothing of it is cached.
        let file = d.path("o.img");
        run(Command::new("fallocate").args(["-l", "16M"]).arg(&file));
        assert_eq!(resident_bytes(&file), 0);
        d.ok(&["attach", "--device", file.to_str().unwrap()]);
        let origin = d.uri("o.img");
        qemu_io(&origin, &["write -P 0x5a 0 4M", "read -P 0x5a 0 4M"]);
        d.snapshot("o.img");
        // First writes copy their chunks (read from the origin) first.
        qemu_io(&origin, &["write -P 0x66 1M 2M", "read -P 0x66 1M 2M"]);
        let image = d.uri("snapshot/o.img");
        qemu_io(&image, &["read -P 0x5a 0 4M", "read -P 0 4M 12M"]);
        let resident = resident_bytes(&file);
        if bypassed {
            assert_eq!(
                resident, 0,
                "origin_cache = none left {resident} bytes of the origin cached"
            );
        } else {
            assert!(
                resident >= 4 * MIB,
                "writeback cached only {resident} bytes"
            );
        }
        // Unaligned to 512 bytes: through the page cache, coherent with the
        // direct I/O around it.
        qemu_io(&origin, &["write -P 0x77 4097 1000"]);
        qemu_io(
            &origin,
            &[
                "read -P 0x5a 0 4097",
                "read -P 0x77 4097 1000",
                "read -P 0x5a 5097 1043479",
                "read -P 0x66 1M 2M",
                "read -P 0x5a 3M 1M",
            ],
        );
        let mut on_file = vec![0u8; 4 * MIB as usize];
        use std::os::unix::fs::FileExt;
        std::fs::File::open(&file)
            .unwrap()
            .read_exact_at(&mut on_file, 0)
            .unwrap();
        let expected = |at: usize| match at {
            4097..=5096 => 0x77,
            _ if at < MIB as usize || at >= 3 * MIB as usize => 0x5a,
            _ => 0x66,
        };
        let wrong = (0..on_file.len()).find(|&i| on_file[i] != expected(i));
        assert_eq!(
            wrong, None,
            "origin_cache = {cache}: the origin file differs"
        );
        qemu_io(&image, &["read -P 0x5a 0 4M"]);
    }
}
