//! Change tracking that survives the daemon: a real `blksnapd` with a state
//! directory (`<dir>/state`), stopped cleanly, killed with SIGKILL and
//! started again over the same directory, with writes through its NBD
//! export (qemu-io) and the consumer's view of the maps (`cbtinfo`,
//! `readcbtmap`, `snapshot_waitevent`).
//!
//! The consumer rule checked throughout: after a take, block `b` changed
//! since change number `N` iff byte `b` of the readable map is above `N`.
//!
//! qemu-io (and stdbuf, for the write-ahead writer) are installed by
//! `scripts/install-deps`; outside CI a missing tool skips its test loudly,
//! in CI (CI=true) it fails. The loop-device tests need root as well, with
//! the same rule.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use blksnap_test_support::{changed_since, is_root};
use common::nbd_tools::{have, nbd_write, run, wrote};
use common::Daemon;
use serde_json::Value;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// The tracking block of the small devices here.
const BLOCK: u64 = 64 * KIB;

// ---------------------------------------------------------------------------
// Helpers.

/// The blocks that byte ranges `(offset, length)` touch.
fn blocks_of(writes: &[(u64, u64)]) -> BTreeSet<usize> {
    writes
        .iter()
        .flat_map(|&(at, len)| (at / BLOCK) as usize..=((at + len - 1) / BLOCK) as usize)
        .collect()
}

/// The blocks above change number `number` in `map`.
fn changed(map: &[u8], number: u64) -> BTreeSet<usize> {
    changed_since(map, number).into_iter().collect()
}

fn union(sets: &[&BTreeSet<usize>]) -> BTreeSet<usize> {
    sets.iter().flat_map(|s| s.iter().copied()).collect()
}

/// What `cbtinfo` prints, every line of it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cbt {
    block_size: u64,
    capacity: u64,
    block_count: u64,
    generation: String,
    changes: u64,
    reason: String,
}

fn cbtinfo(d: &Daemon, device: &str) -> Cbt {
    let mut f = d.ok_fields(&["cbtinfo", "--device", device]);
    let mut take = |k: &str| {
        f.remove(k)
            .unwrap_or_else(|| panic!("cbtinfo of {device} lacks {k}"))
    };
    let info = Cbt {
        block_size: take("block_size").parse().unwrap(),
        capacity: take("device_capacity").parse().unwrap(),
        block_count: take("block_count").parse().unwrap(),
        generation: take("generation_id"),
        changes: take("changes_number").parse().unwrap(),
        reason: take("generation_reason"),
    };
    assert!(f.is_empty(), "cbtinfo of {device}: unexpected lines {f:?}");
    // The JSON form says the same.
    let json: Value =
        serde_json::from_str(&d.ok(&["--json", "cbtinfo", "--device", device])).unwrap();
    assert_eq!(json["generation_reason"], info.reason.as_str(), "{json}");
    assert_eq!(json["generation_id"], info.generation.as_str(), "{json}");
    assert_eq!(json["changes_number"], info.changes, "{json}");
    info
}

/// A snapshot of `devices` (difference storage in the daemon's directory),
/// taken; returns its id.
fn take(d: &Daemon, devices: &[&str]) -> String {
    let mut args = vec!["snapshot_create"];
    for device in devices {
        args.extend(["--device", device]);
    }
    args.extend(["--file", ".", "--limit", "1G"]);
    let id = d.ok(&args).trim().to_string();
    d.ok(&["snapshot_take", "--id", &id]);
    id
}

/// Takes and destroys a snapshot of `devices`, asserting it queued no
/// event (no `cbt_reset`).
fn take_quietly(d: &Daemon, devices: &[&str]) {
    let id = take(d, devices);
    assert_eq!(next_event(d, &id, 0), "event=none");
    d.ok(&["snapshot_destroy", "--id", &id]);
}

/// `snapshot_waitevent` output after the original's `result=` and `time=`
/// lines (checked), lines joined by spaces; `event=none` for a timeout.
fn next_event(d: &Daemon, id: &str, timeout_ms: u64) -> String {
    let out = d.ok(&[
        "snapshot_waitevent",
        "--id",
        id,
        "--timeout",
        &timeout_ms.to_string(),
    ]);
    common::event_lines(&out).join(" ")
}

fn reset_event(device: &str, reason: &str) -> String {
    format!("event=cbt_reset device={device} generation_reason={reason}")
}

fn state_devices(dir: &Path) -> PathBuf {
    dir.join("state/devices")
}

/// The state directory's files by extension (`json`, `cbt`, `journal`,
/// `clean`): how many of each.
fn state_files(dir: &Path) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(state_devices(dir)).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        let (_, ext) = name.rsplit_once('.').unwrap();
        *out.entry(ext.to_string()).or_insert(0) += 1;
    }
    out
}

fn counts(pairs: &[(&str, usize)]) -> BTreeMap<String, usize> {
    pairs.iter().map(|&(k, n)| (k.to_string(), n)).collect()
}

/// The records (`<id>.json`) of the state directory, parsed, by device
/// name, with the id.
fn records(dir: &Path) -> BTreeMap<String, (String, Value)> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(state_devices(dir)).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let record: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let id = path.file_stem().unwrap().to_str().unwrap().to_string();
        out.insert(record["name"].as_str().unwrap().to_string(), (id, record));
    }
    out
}

/// `list` lines for attached devices `(name, size)` whose files are in the
/// daemon's directory.
fn device_lines(d: &Daemon, devices: &[(&str, u64)]) -> Vec<String> {
    devices
        .iter()
        .map(|(name, size)| {
            let path = d.path(name).canonicalize().unwrap();
            format!(
                "device={} size={size} path={} snapshot=-",
                Path::new(name).file_name().unwrap().to_str().unwrap(),
                path.display()
            )
        })
        .collect()
}

/// `list` lines, sorted: after a restart devices come in the order of
/// their records, not of their attaches.
fn list(d: &Daemon) -> Vec<String> {
    let mut lines: Vec<String> = d.ok(&["list"]).lines().map(str::to_string).collect();
    lines.sort();
    lines
}

/// A one-line loud skip (outside CI) or a failure (in CI) for a test that
/// cannot run here.
fn skip_or_fail(test: &str, reason: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: {reason}; CI is set, so this test must run"
    );
    let _ = std::io::stderr().write_all(
        format!(
            "\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
             SKIPPED: {test}: {reason}\n\
             !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
        )
        .as_bytes(),
    );
}

// ---------------------------------------------------------------------------
// 1, 2: clean stop and SIGKILL, clean-stop mode.

/// Writes of the first phase (before the first take), the second (after
/// it, before the stop) and the third (after the restart), per device.
struct Phases {
    w1: [Vec<(u64, u64)>; 2],
    w2: [Vec<(u64, u64)>; 2],
    w3: [Vec<(u64, u64)>; 2],
}

fn phases() -> Phases {
    Phases {
        w1: [
            vec![(0, 4 * KIB), (5 * BLOCK, BLOCK), (100 * BLOCK + 512, KIB)],
            vec![(3 * BLOCK, 8 * KIB), (200 * BLOCK, 512)],
        ],
        w2: [
            vec![
                (5 * BLOCK + 4 * KIB, 4 * KIB),
                (17 * BLOCK, 2 * BLOCK),
                (255 * BLOCK + 60 * KIB, 4 * KIB),
            ],
            vec![(4 * BLOCK, 4 * KIB)],
        ],
        w3: [
            vec![(30 * BLOCK + 60 * KIB, 8 * KIB)],
            vec![(200 * BLOCK, 4 * KIB), (9 * BLOCK, 512)],
        ],
    }
}

const DEVICES: [&str; 2] = ["a.img", "b.img"];
const SIZE: u64 = 16 * MIB;

/// Two 16 MiB files attached; the first writes, a take, the second
/// writes. Returns (cbtinfo, readable map) of each device at the end.
fn two_devices_written(d: &Daemon, p: &Phases) -> Vec<(Cbt, Vec<u8>)> {
    for name in DEVICES {
        d.image(name, SIZE);
        let attached = d.ok(&["attach", "--device", name]);
        assert_eq!(
            attached.lines().take(2).collect::<Vec<_>>(),
            ["Attached successfully", format!("device={name}").as_str()]
        );
        let fresh = cbtinfo(d, name);
        assert_eq!(
            (fresh.block_size, fresh.capacity, fresh.block_count),
            (BLOCK, SIZE, SIZE / BLOCK)
        );
        assert_eq!((fresh.changes, fresh.reason.as_str()), (0, "attached"));
    }
    for (i, name) in DEVICES.iter().enumerate() {
        nbd_write(d, name, &p.w1[i], 0x11);
    }
    take_quietly(d, &DEVICES);
    for (i, name) in DEVICES.iter().enumerate() {
        nbd_write(d, name, &p.w2[i], 0x22);
    }
    let out: Vec<_> = DEVICES
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let info = cbtinfo(d, name);
            assert_eq!((info.changes, info.reason.as_str()), (1, "attached"));
            let map = d.cbt_map(name);
            assert_eq!(map.len() as u64, SIZE / BLOCK);
            // The readable map is the one of the take: the first writes.
            assert_eq!(changed(&map, 0), blocks_of(&p.w1[i]), "{name}");
            assert_eq!(changed(&map, 1), BTreeSet::new(), "{name}");
            (info, map)
        })
        .collect();
    assert_ne!(out[0].0.generation, out[1].0.generation);
    out
}

#[test]
fn clean_stop_restores_both_devices_with_their_generation_and_maps() {
    if !have("qemu-io") {
        return;
    }
    let p = phases();
    let mut d = Daemon::start();
    let before = two_devices_written(&d, &p);
    let dir = d.shutdown_keep_dir();
    // Saved: a record, maps and the clean mark each, no journal.
    assert_eq!(
        state_files(dir.path()),
        counts(&[("cbt", 2), ("clean", 2), ("json", 2)])
    );
    for (name, (_, record)) in records(dir.path()) {
        assert_eq!(record["attached"], true, "{name}: {record}");
        assert_eq!(record["cbt_persistence"], "clean-stop", "{name}: {record}");
    }

    let d = Daemon::start_in(dir, &[]);
    assert_eq!(
        list(&d),
        device_lines(&d, &[("a.img", SIZE), ("b.img", SIZE)])
    );
    let list_json: Value = serde_json::from_str(&d.ok(&["--json", "list"])).unwrap();
    assert!(
        list_json
            .get("missing")
            .is_none_or(|m| m == &Value::Array(vec![])),
        "{list_json}"
    );
    for (name, (info, map)) in DEVICES.iter().zip(&before) {
        let restored = cbtinfo(&d, name);
        assert_eq!(
            restored,
            Cbt {
                reason: "restored".into(),
                ..info.clone()
            },
            "{name}"
        );
        assert!(
            d.cbt_map(name) == *map,
            "{name}: readable map differs after the restart"
        );
    }
    for (i, name) in DEVICES.iter().enumerate() {
        nbd_write(&d, name, &p.w3[i], 0x33);
    }
    // A restored generation: the take queues no cbt_reset.
    take_quietly(&d, &DEVICES);
    for (i, name) in DEVICES.iter().enumerate() {
        let info = cbtinfo(&d, name);
        assert_eq!((info.changes, info.reason.as_str()), (2, "restored"));
        assert_eq!(info.generation, before[i].0.generation);
        let map = d.cbt_map(name);
        let (w1, w2, w3) = (
            blocks_of(&p.w1[i]),
            blocks_of(&p.w2[i]),
            blocks_of(&p.w3[i]),
        );
        // Since the first take: exactly what was written after it, before
        // and after the restart.
        assert_eq!(changed(&map, 1), union(&[&w2, &w3]), "{name}");
        assert_eq!(changed(&map, 0), union(&[&w1, &w2, &w3]), "{name}");
        assert_eq!(changed(&map, 2), BTreeSet::new(), "{name}");
    }
}

#[test]
fn sigterm_saves_the_maps_too() {
    if !have("qemu-io") {
        return;
    }
    let p = phases();
    let mut d = Daemon::start();
    let before = two_devices_written(&d, &p);
    let dir = d.stop_keep_dir();
    assert_eq!(
        state_files(dir.path()),
        counts(&[("cbt", 2), ("clean", 2), ("json", 2)])
    );
    let d = Daemon::start_in(dir, &[]);
    for (name, (info, map)) in DEVICES.iter().zip(&before) {
        assert_eq!(
            cbtinfo(&d, name),
            Cbt {
                reason: "restored".into(),
                ..info.clone()
            }
        );
        assert!(d.cbt_map(name) == *map, "{name}: readable map differs");
    }
}

#[test]
fn kill_9_starts_a_new_generation_unclean_stop_and_the_take_queues_cbt_reset() {
    if !have("qemu-io") {
        return;
    }
    let p = phases();
    let mut d = Daemon::start();
    let before = two_devices_written(&d, &p);
    // Attached and running: not marked clean.
    assert_eq!(
        state_files(d.dir.path()),
        counts(&[("cbt", 2), ("json", 2)])
    );
    let dir = d.kill();
    let d = Daemon::start_in(dir, &[]);
    assert_eq!(
        list(&d),
        device_lines(&d, &[("a.img", SIZE), ("b.img", SIZE)])
    );
    for (name, (info, _)) in DEVICES.iter().zip(&before) {
        let now = cbtinfo(&d, name);
        assert_ne!(now.generation, info.generation, "{name}: generation kept");
        assert_eq!(
            now,
            Cbt {
                generation: now.generation.clone(),
                changes: 0,
                reason: "unclean-stop".into(),
                ..info.clone()
            }
        );
        assert_eq!(d.cbt_map(name), vec![0; (SIZE / BLOCK) as usize], "{name}");
    }
    for (i, name) in DEVICES.iter().enumerate() {
        nbd_write(&d, name, &p.w3[i], 0x33);
    }
    let id = take(&d, &DEVICES);
    let events: BTreeSet<String> = (0..2).map(|_| next_event(&d, &id, 1000)).collect();
    assert_eq!(
        events,
        DEVICES
            .iter()
            .map(|n| reset_event(n, "unclean-stop"))
            .collect::<BTreeSet<_>>()
    );
    assert_eq!(next_event(&d, &id, 0), "event=none");
    d.ok(&["snapshot_destroy", "--id", &id]);
    for (i, name) in DEVICES.iter().enumerate() {
        let info = cbtinfo(&d, name);
        assert_eq!((info.changes, info.reason.as_str()), (1, "unclean-stop"));
        // The new generation knows only what was written in it.
        let map = d.cbt_map(name);
        assert_eq!(changed(&map, 0), blocks_of(&p.w3[i]), "{name}");
    }
    // Only the first take of the generation says so.
    take_quietly(&d, &DEVICES);
}

#[test]
fn a_clean_stop_with_a_snapshot_taken_saves_the_writes_made_under_it() {
    if !have("qemu-io") {
        return;
    }
    let mut d = Daemon::start();
    d.image("s.img", SIZE);
    d.ok(&["attach", "--device", "s.img"]);
    let w1 = [(BLOCK, 4 * KIB)];
    let w2 = [(50 * BLOCK, 2 * BLOCK)];
    nbd_write(&d, "s.img", &w1, 0x12);
    // Taken and not destroyed: the stop destroys it.
    take(&d, &["s.img"]);
    nbd_write(&d, "s.img", &w2, 0x13);
    let before = cbtinfo(&d, "s.img");
    let map = d.cbt_map("s.img");
    let dir = d.shutdown_keep_dir();
    let d = Daemon::start_in(dir, &[]);
    assert_eq!(d.ok(&["snapshot_collect"]).trim(), "");
    assert_eq!(
        cbtinfo(&d, "s.img"),
        Cbt {
            reason: "restored".into(),
            ..before
        }
    );
    assert!(d.cbt_map("s.img") == map, "readable map differs");
    take_quietly(&d, &["s.img"]);
    let map = d.cbt_map("s.img");
    assert_eq!(changed(&map, 1), blocks_of(&w2));
    assert_eq!(changed(&map, 0), union(&[&blocks_of(&w1), &blocks_of(&w2)]));
}

// ---------------------------------------------------------------------------
// 3: write-ahead mode.

/// `stdbuf -oL qemu-io` with `writes` against `uri`: its output line by
/// line while it runs.
fn streaming_writer(uri: &str, writes: &[(u64, u64)], pattern: u8) -> std::process::Child {
    let mut cmd = Command::new("stdbuf");
    cmd.args(["-oL", "qemu-io", "-f", "raw"]);
    for (at, len) in writes {
        cmd.arg("-c").arg(format!("write -P {pattern} {at} {len}"));
    }
    cmd.arg(uri)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn write_ahead_keeps_the_generation_and_every_acknowledged_write_across_20_kills() {
    if !(have("qemu-io") && have("stdbuf")) {
        return;
    }
    const ROUNDS: usize = 20;
    const DEV_SIZE: u64 = 32 * MIB;
    let mut rng = fastrand::Rng::with_seed(0x5eed_b10c_0003);
    let mut d = Daemon::start();
    d.image("w.img", DEV_SIZE);
    d.ok(&[
        "attach",
        "--device",
        "w.img",
        "--cbt-persistence",
        "write-ahead",
    ]);
    let first = cbtinfo(&d, "w.img");
    assert_eq!((first.changes, first.reason.as_str()), (0, "attached"));
    assert_eq!(first.block_size, BLOCK);
    let mut number = 0;
    // (acknowledged, attempted) blocks of the last round's writer.
    let mut last: Option<(BTreeSet<usize>, BTreeSet<usize>)> = None;
    for round in 0..=ROUNDS {
        if round > 0 {
            let info = cbtinfo(&d, "w.img");
            assert_eq!(
                info,
                Cbt {
                    changes: number,
                    reason: "restored".into(),
                    ..first.clone()
                },
                "round {round}: {}",
                d.log()
            );
        }
        // The readable map becomes the live one: what the restart kept.
        take_quietly(&d, &["w.img"]);
        number += 1;
        assert_eq!(cbtinfo(&d, "w.img").changes, number);
        let map = d.cbt_map("w.img");
        assert_eq!(changed(&map, number), BTreeSet::new());
        if let Some((acked, attempted)) = &last {
            let since = changed(&map, number - 1);
            let lost: Vec<_> = acked.difference(&since).collect();
            assert!(
                lost.is_empty(),
                "round {round}: acknowledged blocks {lost:?} not above {}: {since:?}",
                number - 1
            );
            let extra: Vec<_> = since.difference(attempted).collect();
            assert!(extra.is_empty(), "round {round}: never written {extra:?}");
        }
        if round == ROUNDS {
            break;
        }
        let readable = map;
        let n = rng.usize(4..=12);
        let writes: Vec<(u64, u64)> = (0..n)
            .map(|_| {
                let len = 512 * rng.u64(1..=384);
                let at = 512 * rng.u64(0..=(DEV_SIZE - len) / 512);
                (at, len)
            })
            .collect();
        // Killed after this many acknowledgements: in the middle of the
        // writer's run, or right after its last write.
        let kill_after = rng.usize(1..=n);
        let mut writer = streaming_writer(&d.uri("w.img"), &writes, rng.u8(1..));
        let mut acknowledged = Vec::new();
        let mut dir = None;
        for line in BufReader::new(writer.stdout.take().unwrap()).lines() {
            if let Some(w) = wrote(&line.unwrap()) {
                acknowledged.push(w);
                if acknowledged.len() == kill_after {
                    dir = Some(d.kill());
                }
            }
        }
        writer.wait().unwrap();
        let dir = dir.unwrap_or_else(|| {
            panic!("round {round}: {acknowledged:?} of {writes:?} acknowledged")
        });
        for w in &acknowledged {
            assert!(writes.contains(w), "round {round}: {w:?} not asked for");
        }
        if round == 0 {
            assert_eq!(
                state_files(dir.path()),
                counts(&[("cbt", 1), ("journal", 1), ("json", 1), ("seen", 1)])
            );
            let (_, record) = records(dir.path()).remove("w.img").unwrap();
            assert_eq!(record["cbt_persistence"], "write-ahead", "{record}");
        }
        last = Some((blocks_of(&acknowledged), blocks_of(&writes)));
        d = Daemon::start_in(dir, &[]);
        // The readable map is the one of the take before the kill.
        assert!(
            d.cbt_map("w.img") == readable,
            "round {round}: readable map changed across the kill"
        );
    }
    let replays = d.log_lines(&["change journal replayed"]).len();
    assert_eq!(replays, ROUNDS, "{}", d.log());
}

#[test]
fn write_ahead_from_the_config_file_and_clean_stop_asked_at_attach() {
    if !have("qemu-io") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("blksnapd.toml");
    std::fs::write(&config, "cbt_persistence = \"write-ahead\"\n").unwrap();
    let config = config.to_str().unwrap().to_string();
    let args = ["--config", config.as_str()];
    let d = Daemon::start_in(dir, &args);
    d.image("wal.img", SIZE);
    d.image("plain.img", SIZE);
    d.ok(&["attach", "--device", "wal.img"]);
    d.ok(&[
        "attach",
        "--device",
        "plain.img",
        "--cbt-persistence",
        "clean-stop",
    ]);
    let records = records(d.dir.path());
    assert_eq!(records["wal.img"].1["cbt_persistence"], "write-ahead");
    assert_eq!(records["plain.img"].1["cbt_persistence"], "clean-stop");
    let before: Vec<Cbt> = ["wal.img", "plain.img"]
        .iter()
        .map(|n| cbtinfo(&d, n))
        .collect();
    take_quietly(&d, &["wal.img", "plain.img"]);
    let writes = [(7 * BLOCK, 4 * KIB), (8 * BLOCK - 512, 1024)];
    nbd_write(&d, "wal.img", &writes, 0x44);
    nbd_write(&d, "plain.img", &writes, 0x44);
    let mut d = d;
    let dir = d.kill();
    let d = Daemon::start_in(dir, &args);
    let wal = cbtinfo(&d, "wal.img");
    assert_eq!(
        wal,
        Cbt {
            changes: 1,
            reason: "restored".into(),
            ..before[0].clone()
        }
    );
    let plain = cbtinfo(&d, "plain.img");
    assert_ne!(plain.generation, before[1].generation);
    assert_eq!((plain.changes, plain.reason.as_str()), (0, "unclean-stop"));
    let id = take(&d, &["wal.img", "plain.img"]);
    assert_eq!(
        next_event(&d, &id, 1000),
        reset_event("plain.img", "unclean-stop")
    );
    assert_eq!(next_event(&d, &id, 0), "event=none");
    d.ok(&["snapshot_destroy", "--id", &id]);
    assert_eq!(changed(&d.cbt_map("wal.img"), 1), blocks_of(&writes));
    assert_eq!(changed(&d.cbt_map("plain.img"), 0), BTreeSet::new());
}

// ---------------------------------------------------------------------------
// 4: identity and fingerprint of image files.

/// A daemon with `names` (16 MiB files in `<dir>/img/`, so that a bare
/// name on the command line is a name, not a path) attached, a take, a
/// write each; stopped cleanly. Returns the directory and each cbtinfo.
fn stopped_with_files(names: &[&str]) -> (tempfile::TempDir, Vec<Cbt>) {
    let mut d = Daemon::start();
    std::fs::create_dir(d.path("img")).unwrap();
    for name in names {
        d.image(&format!("img/{name}"), SIZE);
        d.ok(&["attach", "--device", &format!("img/{name}")]);
    }
    take_quietly(&d, names);
    for name in names {
        nbd_write(&d, name, &[(2 * BLOCK, 4 * KIB)], 0x55);
    }
    let infos = names.iter().map(|n| cbtinfo(&d, n)).collect();
    (d.stop_keep_dir(), infos)
}

/// Starts over `dir`; asserts `changed` began a new generation for
/// `changed-while-detached` and `control` was restored; the take queues a
/// cbt_reset for `changed` only.
fn check_changed_while_detached(dir: tempfile::TempDir, before: &[Cbt]) {
    let d = Daemon::start_in(dir, &[]);
    let changed_info = cbtinfo(&d, "changed.img");
    assert_ne!(changed_info.generation, before[0].generation);
    assert_eq!(
        (changed_info.changes, changed_info.reason.as_str()),
        (0, "changed-while-detached"),
        "{}",
        d.log()
    );
    assert_eq!(
        cbtinfo(&d, "control.img"),
        Cbt {
            reason: "restored".into(),
            ..before[1].clone()
        }
    );
    let id = take(&d, &["changed.img", "control.img"]);
    assert_eq!(
        next_event(&d, &id, 1000),
        reset_event("changed.img", "changed-while-detached")
    );
    assert_eq!(next_event(&d, &id, 0), "event=none");
}

#[test]
fn a_file_written_while_stopped_starts_changed_while_detached() {
    if !have("qemu-io") {
        return;
    }
    let (dir, before) = stopped_with_files(&["changed.img", "control.img"]);
    let path = dir.path().join("img/changed.img");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .write_all_at(&[0xAA], 10 * BLOCK)
        .unwrap();
    check_changed_while_detached(dir, &before);
}

#[test]
fn a_file_whose_mtime_alone_changed_while_stopped_starts_changed_while_detached() {
    if !have("qemu-io") {
        return;
    }
    let (dir, before) = stopped_with_files(&["changed.img", "control.img"]);
    let path = dir.path().join("img/changed.img");
    let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
    let earlier = mtime - Duration::from_secs(3600);
    std::fs::File::options()
        .write(true)
        .open(&path)
        .unwrap()
        .set_modified(earlier)
        .unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    assert_eq!(meta.modified().unwrap(), earlier);
    assert_eq!(meta.len(), SIZE);
    check_changed_while_detached(dir, &before);
}

/// Stopped with `replaced.img` and `control.img`; `replaced.img` then
/// replaced by a new file (another inode) at the same path. Returns the
/// started daemon.
fn started_with_a_replaced_file() -> Daemon {
    let (dir, _) = stopped_with_files(&["replaced.img", "control.img"]);
    let path = dir.path().join("img/replaced.img");
    let old = std::fs::metadata(&path).unwrap();
    let new = dir.path().join("img/replaced.img.new");
    std::fs::File::create(&new).unwrap().set_len(SIZE).unwrap();
    std::fs::rename(&new, &path).unwrap();
    assert_ne!(std::fs::metadata(&path).unwrap().ino(), old.ino());
    let d = Daemon::start_in(dir, &[]);
    let canonical = d.path("img/replaced.img").canonicalize().unwrap();
    let lines = list(&d);
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(
        lines[..1],
        device_lines(&d, &[("img/control.img", SIZE)])[..]
    );
    let prefix = format!("missing=replaced.img path={} reason=", canonical.display());
    let reason = lines[1]
        .strip_prefix(&prefix)
        .unwrap_or_else(|| panic!("{:?} is not {prefix:?}...", lines[1]));
    assert!(reason.contains("identity"), "{reason}");
    let json: Value = serde_json::from_str(&d.ok(&["--json", "list"])).unwrap();
    assert_eq!(
        json["missing"],
        serde_json::json!([{
            "name": "replaced.img",
            "path": canonical.display().to_string(),
            "reason": reason,
        }])
    );
    // Not attached: not tracked, not served.
    d.fails(&["cbtinfo", "--device", "replaced.img"], &["replaced.img"]);
    assert_eq!(cbtinfo(&d, "control.img").reason, "restored", "{}", d.log());
    d
}

#[test]
fn a_file_replaced_at_its_path_is_missing_until_detached_by_name() {
    if !have("qemu-io") {
        return;
    }
    let mut d = started_with_a_replaced_file();
    d.ok(&["detach", "--device", "replaced.img"]);
    assert_eq!(list(&d), device_lines(&d, &[("img/control.img", SIZE)]));
    // The record is gone with its maps.
    assert_eq!(
        state_files(d.dir.path()),
        counts(&[("cbt", 1), ("json", 1)])
    );
    assert_eq!(
        records(d.dir.path()).keys().collect::<Vec<_>>(),
        ["control.img"]
    );
    // ...for good: not missing after a restart, and a new attach is new.
    let dir = d.stop_keep_dir();
    let d = Daemon::start_in(dir, &[]);
    assert_eq!(list(&d), device_lines(&d, &[("img/control.img", SIZE)]));
    d.ok(&["attach", "--device", "img/replaced.img"]);
    assert_eq!(cbtinfo(&d, "replaced.img").reason, "attached");
}

#[test]
fn a_file_replaced_at_its_path_is_missing_until_detached_by_path() {
    if !have("qemu-io") {
        return;
    }
    let d = started_with_a_replaced_file();
    // `--device` takes a name or a path (the CLI sends a path absolute).
    d.ok(&["detach", "--device", "img/replaced.img"]);
    assert_eq!(list(&d), device_lines(&d, &[("img/control.img", SIZE)]));
    assert_eq!(
        state_files(d.dir.path()),
        counts(&[("cbt", 1), ("json", 1)])
    );
}

// ---------------------------------------------------------------------------
// 5: ext4 on a loop device, mounted while no daemon ran (root).

/// A loop device (and a mount on it) made by the test: unmounted and
/// detached in Drop, also on failure.
struct LoopGuard {
    device: String,
    mounted: Option<PathBuf>,
}

impl LoopGuard {
    fn new(file: &Path) -> Self {
        let out = run(Command::new("losetup").args(["--find", "--show", file.to_str().unwrap()]));
        let device = String::from_utf8(out.stdout).unwrap().trim().to_string();
        assert!(device.starts_with("/dev/loop"), "{device}");
        Self {
            device,
            mounted: None,
        }
    }

    fn mount(&mut self, at: &Path) {
        std::fs::create_dir_all(at).unwrap();
        run(Command::new("mount").arg(&self.device).arg(at));
        self.mounted = Some(at.to_path_buf());
    }

    fn umount(&mut self) {
        let at = self.mounted.take().unwrap();
        run(Command::new("umount").arg(&at));
    }
}

impl Drop for LoopGuard {
    fn drop(&mut self) {
        if let Some(at) = self.mounted.take() {
            let ok = Command::new("umount").arg(&at).status();
            if !ok.is_ok_and(|s| s.success()) {
                let _ = Command::new("umount").arg("-l").arg(&at).status();
            }
        }
        let _ = Command::new("losetup").args(["-d", &self.device]).status();
    }
}

fn loop_ready(test: &str) -> bool {
    let reason = if !is_root() {
        Some("needs root".to_string())
    } else if !Path::new("/dev/loop-control").exists() {
        Some("no /dev/loop-control (loop module)".to_string())
    } else {
        ["losetup", "mkfs.ext4", "mount", "umount"]
            .iter()
            .find(|t| {
                !Command::new("sh")
                    .args(["-c", &format!("command -v {t}")])
                    .output()
                    .is_ok_and(|o| o.status.success())
            })
            .map(|t| format!("{t} not found"))
    };
    match reason {
        None => true,
        Some(reason) => {
            skip_or_fail(test, &reason);
            false
        }
    }
}

/// ext4 on a 64 MiB file, attached through its loop device; a take; a
/// clean stop; mounted and written (when `mount`) while stopped; a start.
/// Returns (cbtinfo before the stop, cbtinfo after the start).
fn ext4_loop_round(mount: bool) -> (Cbt, Cbt) {
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("ext4.img");
    std::fs::File::create(&file)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    run(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&file));
    let mut guard = LoopGuard::new(&file);
    let name = guard.device.strip_prefix("/dev/").unwrap().to_string();
    let mut d = Daemon::start();
    let attached = d.ok(&["attach", "--device", &guard.device]);
    assert_eq!(
        attached.lines().take(2).collect::<Vec<_>>(),
        ["Attached successfully", format!("device={name}").as_str()]
    );
    take_quietly(&d, &[&name]);
    let before = cbtinfo(&d, &name);
    assert_eq!((before.changes, before.reason.as_str()), (1, "attached"));
    let dir = d.stop_keep_dir();
    let (_, record) = records(dir.path()).remove(&name).unwrap();
    assert_eq!(record["identity"]["kind"], "block", "{record}");
    assert!(
        record["identity"]["serial"]
            .as_str()
            .is_some_and(|s| s.starts_with("loop-backing:")),
        "{record}"
    );
    assert!(
        record["fingerprint"]["filesystem"]
            .as_str()
            .is_some_and(|s| s.starts_with("ext4 ")),
        "{record}"
    );
    if mount {
        let at = work.path().join("mnt");
        guard.mount(&at);
        std::fs::write(at.join("written-while-stopped"), b"not tracked\n").unwrap();
        guard.umount();
    }
    let mut d = Daemon::start_in(dir, &[]);
    let lines = list(&d);
    assert_eq!(
        lines,
        [format!(
            "device={name} size={} path={} snapshot=-",
            64 * MIB,
            guard.device
        )]
    );
    let after = cbtinfo(&d, &name);
    d.stop_keep_dir();
    (before, after)
}

#[test]
fn ext4_on_a_loop_device_mounted_while_stopped_is_changed_while_detached() {
    if !loop_ready("ext4_on_a_loop_device_mounted_while_stopped_is_changed_while_detached") {
        return;
    }
    let (before, after) = ext4_loop_round(true);
    assert_ne!(after.generation, before.generation);
    assert_eq!(
        (after.changes, after.reason.as_str()),
        (0, "changed-while-detached")
    );
}

#[test]
fn ext4_on_a_loop_device_left_alone_while_stopped_is_restored() {
    if !loop_ready("ext4_on_a_loop_device_left_alone_while_stopped_is_restored") {
        return;
    }
    let (before, after) = ext4_loop_round(false);
    assert_eq!(
        after,
        Cbt {
            reason: "restored".into(),
            ..before
        }
    );
}

// ---------------------------------------------------------------------------
// 6: corrupt saved maps.

fn corrupt_cbt_starts_record_corrupt(how: &str, corrupt: impl Fn(&Path), message: &str) {
    let mut d = Daemon::start();
    d.image("c.img", SIZE);
    d.ok(&["attach", "--device", "c.img"]);
    nbd_write(&d, "c.img", &[(BLOCK, 4 * KIB)], 0x66);
    take_quietly(&d, &["c.img"]);
    let before = cbtinfo(&d, "c.img");
    let dir = d.stop_keep_dir();
    let cbts: Vec<PathBuf> = std::fs::read_dir(state_devices(dir.path()))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cbt"))
        .collect();
    assert_eq!(cbts.len(), 1, "{how}: {cbts:?}");
    let cbt = &cbts[0];
    corrupt(cbt);
    let mut d = Daemon::start_in(dir, &[]);
    let info = cbtinfo(&d, "c.img");
    assert_ne!(info.generation, before.generation, "{how}");
    assert_eq!(
        (info.changes, info.reason.as_str()),
        (0, "record-corrupt"),
        "{how}: {}",
        d.log()
    );
    let shown = cbt.display().to_string();
    let lines = d.log_lines(&[&shown, "record-corrupt"]);
    assert!(
        lines.iter().any(|l| l.contains(message)),
        "{how}: no log line naming {shown} with {message:?}:\n{}",
        d.log()
    );
    let id = take(&d, &["c.img"]);
    assert_eq!(
        next_event(&d, &id, 1000),
        reset_event("c.img", "record-corrupt")
    );
    d.ok(&["snapshot_destroy", "--id", &id]);
    // The record is whole again: the next clean restart restores it.
    let after = cbtinfo(&d, "c.img");
    let dir = d.stop_keep_dir();
    let d = Daemon::start_in(dir, &[]);
    assert_eq!(
        cbtinfo(&d, "c.img"),
        Cbt {
            reason: "restored".into(),
            ..after
        },
        "{how}"
    );
}

#[test]
fn a_cbt_file_with_a_flipped_byte_is_record_corrupt() {
    if !have("qemu-io") {
        return;
    }
    corrupt_cbt_starts_record_corrupt(
        "flipped byte",
        |p| {
            let mut bytes = std::fs::read(p).unwrap();
            // In the live map (after the 64-byte header).
            let at = 64 + 1;
            bytes[at] ^= 0x01;
            std::fs::write(p, bytes).unwrap();
        },
        "checksum mismatch",
    );
}

#[test]
fn a_truncated_cbt_file_is_record_corrupt() {
    if !have("qemu-io") {
        return;
    }
    corrupt_cbt_starts_record_corrupt(
        "truncated",
        |p| {
            let len = std::fs::metadata(p).unwrap().len();
            std::fs::OpenOptions::new()
                .write(true)
                .open(p)
                .unwrap()
                .set_len(len / 2)
                .unwrap();
        },
        "checksum mismatch",
    );
}

#[test]
fn a_cbt_file_of_another_version_is_record_corrupt() {
    if !have("qemu-io") {
        return;
    }
    corrupt_cbt_starts_record_corrupt(
        "wrong version",
        |p| {
            let mut bytes = std::fs::read(p).unwrap();
            assert_eq!(&bytes[..8], b"BLKSNAPS");
            assert_eq!(bytes[8..12], 1u32.to_le_bytes());
            bytes[8..12].copy_from_slice(&99u32.to_le_bytes());
            std::fs::write(p, bytes).unwrap();
        },
        "format version 99",
    );
}

#[test]
fn an_empty_cbt_file_is_record_corrupt() {
    if !have("qemu-io") {
        return;
    }
    corrupt_cbt_starts_record_corrupt(
        "empty",
        |p| std::fs::write(p, b"").unwrap(),
        "0 bytes, shorter than a header",
    );
}

// ---------------------------------------------------------------------------
// 7: detach and attach again while the daemon runs.

#[test]
fn detach_and_attach_again_of_an_unchanged_file_restores_its_maps() {
    if !have("qemu-io") {
        return;
    }
    let mut d = Daemon::start();
    d.image("r.img", SIZE);
    d.ok(&["attach", "--device", "r.img"]);
    let w1 = [(3 * BLOCK, 4 * KIB)];
    let w2 = [(40 * BLOCK + 60 * KIB, 8 * KIB)];
    let w3 = [(100 * BLOCK, 512)];
    nbd_write(&d, "r.img", &w1, 0x71);
    take_quietly(&d, &["r.img"]);
    nbd_write(&d, "r.img", &w2, 0x72);
    let before = cbtinfo(&d, "r.img");
    let map = d.cbt_map("r.img");
    d.ok(&["detach", "--device", "r.img"]);
    assert_eq!(list(&d), Vec::<String>::new());
    // Kept, as not attached: a restart does not attach it again...
    let (_, record) = records(d.dir.path()).remove("r.img").unwrap();
    assert_eq!(record["attached"], false, "{record}");
    assert_eq!(
        state_files(d.dir.path()),
        counts(&[("cbt", 1), ("clean", 1), ("json", 1)])
    );
    let dir = d.stop_keep_dir();
    let d = Daemon::start_in(dir, &[]);
    assert_eq!(list(&d), Vec::<String>::new());
    // ...but an attach of the same file goes on with its maps.
    d.ok(&["attach", "--device", "r.img"]);
    assert_eq!(
        cbtinfo(&d, "r.img"),
        Cbt {
            reason: "restored".into(),
            ..before.clone()
        }
    );
    assert!(d.cbt_map("r.img") == map, "readable map differs");
    // And again without a restart in between.
    d.ok(&["detach", "--device", "r.img"]);
    d.ok(&["attach", "--device", "r.img"]);
    assert_eq!(
        cbtinfo(&d, "r.img"),
        Cbt {
            reason: "restored".into(),
            ..before.clone()
        }
    );
    nbd_write(&d, "r.img", &w3, 0x73);
    take_quietly(&d, &["r.img"]);
    let map = d.cbt_map("r.img");
    assert_eq!(changed(&map, 1), union(&[&blocks_of(&w2), &blocks_of(&w3)]));
    assert_eq!(
        changed(&map, 0),
        union(&[&blocks_of(&w1), &blocks_of(&w2), &blocks_of(&w3)])
    );
}

#[test]
fn a_file_written_while_detached_starts_changed_while_detached_at_attach() {
    if !have("qemu-io") {
        return;
    }
    let d = Daemon::start();
    let path = d.image("r.img", SIZE);
    d.ok(&["attach", "--device", "r.img"]);
    nbd_write(&d, "r.img", &[(3 * BLOCK, 4 * KIB)], 0x71);
    take_quietly(&d, &["r.img"]);
    let before = cbtinfo(&d, "r.img");
    d.ok(&["detach", "--device", "r.img"]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .write_all_at(&[1], 0)
        .unwrap();
    d.ok(&["attach", "--device", "r.img"]);
    let after = cbtinfo(&d, "r.img");
    assert_ne!(after.generation, before.generation);
    assert_eq!(
        (after.changes, after.reason.as_str()),
        (0, "changed-while-detached")
    );
    let id = take(&d, &["r.img"]);
    assert_eq!(
        next_event(&d, &id, 1000),
        reset_event("r.img", "changed-while-detached")
    );
}

// ---------------------------------------------------------------------------
// Consumer guarantees across combinations of the above.

/// Write-ahead mode, killed, then the file written while no daemon ran:
/// the consumer rule must still hold after the restart, i.e. either the
/// generation is new or the block written while stopped shows as changed.
#[test]
fn write_ahead_after_a_kill_still_notices_a_file_written_while_stopped() {
    if !have("qemu-io") {
        return;
    }
    let mut d = Daemon::start();
    let path = d.image("p.img", SIZE);
    d.ok(&[
        "attach",
        "--device",
        "p.img",
        "--cbt-persistence",
        "write-ahead",
    ]);
    take_quietly(&d, &["p.img"]);
    nbd_write(&d, "p.img", &[(0, 4 * KIB)], 0x21);
    let before = cbtinfo(&d, "p.img");
    let dir = d.kill();
    // Not through the daemon: nothing tracks this write. It comes "later"
    // (its mtime an hour after the crash, as when a VM boots from the image
    // after the daemon died): a change within a few seconds of the last
    // heartbeat cannot be told from the daemon's own last writes
    // (docs/blksnapd.md, PERSISTENCE).
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(&[0x99], 100 * BLOCK).unwrap();
    file.set_modified(std::time::SystemTime::now() + Duration::from_secs(3600))
        .unwrap();
    drop(file);
    let d = Daemon::start_in(dir, &[]);
    let info = cbtinfo(&d, "p.img");
    let id = take(&d, &["p.img"]);
    let event = next_event(&d, &id, 0);
    d.ok(&["snapshot_destroy", "--id", &id]);
    let map = d.cbt_map("p.img");
    let since = changed(&map, before.changes);
    assert!(
        info.generation != before.generation || since.contains(&100),
        "generation {} kept ({}) and block 100, written while no daemon ran, \
         not above change number {}: changed since {since:?}, event {event:?}",
        info.generation,
        info.reason,
        before.changes
    );
}

/// A generation begun by an unclean stop, then a clean restart before its
/// first take: that first take still tells the consumer (cbt_reset) that
/// the generation replaced an earlier one.
#[test]
fn the_first_take_of_an_unclean_stop_generation_queues_cbt_reset_even_after_a_clean_restart() {
    if !have("qemu-io") {
        return;
    }
    let mut d = Daemon::start();
    d.image("p.img", SIZE);
    d.ok(&["attach", "--device", "p.img"]);
    take_quietly(&d, &["p.img"]);
    nbd_write(&d, "p.img", &[(0, 4 * KIB)], 0x31);
    let dir = d.kill();
    let mut d = Daemon::start_in(dir, &[]);
    let after_kill = cbtinfo(&d, "p.img");
    assert_eq!(
        (after_kill.changes, after_kill.reason.as_str()),
        (0, "unclean-stop")
    );
    let dir = d.stop_keep_dir();
    let d = Daemon::start_in(dir, &[]);
    let restarted = cbtinfo(&d, "p.img");
    assert_eq!(restarted.generation, after_kill.generation);
    assert_eq!(restarted.changes, 0);
    let id = take(&d, &["p.img"]);
    assert_eq!(
        next_event(&d, &id, 1000),
        reset_event("p.img", "unclean-stop"),
        "cbtinfo after the clean restart: {restarted:?}"
    );
}

// ---------------------------------------------------------------------------
// Bad state directories (root: a tmpfs of our own, read-only or tiny).

/// A tmpfs mounted for one test, unmounted (lazily) on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, options: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(at));
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn root_ready(test: &str) -> bool {
    if !is_root() {
        skip_or_fail(test, "needs root (tmpfs mounts)");
        return false;
    }
    true
}

/// A state directory on a read-only filesystem stops the start, with one
/// line naming it: never a daemon that runs without persisting.
#[test]
fn a_state_dir_on_a_read_only_filesystem_refuses_the_start() {
    if !root_ready("a_state_dir_on_a_read_only_filesystem_refuses_the_start") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let _fs = Tmpfs::mount(&state, "ro,size=1m");
    let out = common::blksnapd_command(&dir.path().join("c.sock"), &state)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("blksnapd: "))
        .unwrap_or_else(|| panic!("no error line: {stderr}"));
    assert!(
        line.contains(state.to_str().unwrap()) && line.contains("Read-only file system"),
        "{line}"
    );
}

/// A full state filesystem at the stop: the save fails with a clear log
/// line, the stop is still clean, and since no clean mark is made, the next
/// start does not trust stale maps (`unclean-stop`).
#[test]
fn a_full_state_dir_at_stop_is_logged_and_the_next_start_is_unclean_stop() {
    if !(root_ready("a_full_state_dir_at_stop_is_logged_and_the_next_start_is_unclean_stop")
        && have("qemu-io"))
    {
        return;
    }
    let work = tempfile::tempdir().unwrap();
    let _fs = Tmpfs::mount(&work.path().join("state"), "size=256k");
    let mut d = Daemon::start_in(work, &[]);
    d.image("f.img", SIZE);
    d.ok(&["attach", "--device", "f.img"]);
    take_quietly(&d, &["f.img"]);
    nbd_write(&d, "f.img", &[(0, 4 * KIB)], 0x41);
    let before = cbtinfo(&d, "f.img");
    // Fill the state filesystem.
    let filler = d.path("state/filler");
    let mut f = std::fs::File::create(&filler).unwrap();
    while f.write_all(&[0u8; 16 * 1024]).is_ok() {}
    drop(f);
    let dir = d.stop_keep_dir();
    std::fs::remove_file(dir.path().join("state/filler")).unwrap();
    let log = std::fs::read_to_string(dir.path().join("daemon.log")).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("cannot save the change maps")
                && l.contains("f.img")
                && l.contains("No space left on device")),
        "{log}"
    );
    let d = Daemon::start_in(dir, &[]);
    let after = cbtinfo(&d, "f.img");
    assert_ne!(after.generation, before.generation);
    assert_eq!(after.reason, "unclean-stop");
}
