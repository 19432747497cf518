//! blksnap-backup end to end, against a real blksnapd over its control
//! socket and NBD: full and incremental backups of two devices from one
//! snapshot, only changed chunks read, every restored point equal to the
//! devices at their take, verify catching damage and naming it, a killed
//! backup leaving no snapshot and a valid repository, a new generation
//! forcing a full backup with its reason, and bad input refused clearly.
//! Writes go through NBD with qemu-io (installed by scripts/install-deps;
//! outside CI a missing tool skips loudly, in CI it fails).

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use blksnap_test_support::Pattern;
use common::nbd_tools::{have, map, nbd_write, read_all, run};
use common::{blksnap_backup, Daemon};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const CHUNK: u64 = 4 * MIB;

/// blksnap-backup against `d`'s daemon; `--json`, every line parsed.
fn backup(d: &Daemon, repo: &Path, args: &[&str]) -> (Output, Vec<Value>) {
    let out = Command::new(blksnap_backup())
        .arg("--json")
        .arg("--repo")
        .arg(repo)
        .arg("--control")
        .arg(&d.control)
        .args(args)
        .output()
        .unwrap();
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    (out, lines)
}

/// The final result of a successful command.
fn ok(d: &Daemon, repo: &Path, args: &[&str]) -> Value {
    let (out, lines) = backup(d, repo, args);
    let last = lines.last().cloned().unwrap_or(Value::Null);
    assert!(
        out.status.success() && last["ok"] == true,
        "blksnap-backup {args:?}: {out:?}\n{}",
        d.log()
    );
    last
}

/// The error of a failing command: exit status 1 and a message with every
/// needle.
fn fails(d: &Daemon, repo: &Path, args: &[&str], needles: &[&str]) -> String {
    let (out, lines) = backup(d, repo, args);
    assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
    let error = lines.last().unwrap()["error"].as_str().unwrap().to_string();
    for n in needles {
        assert!(error.contains(n), "{args:?}: {error:?} lacks {n:?}");
    }
    error
}

/// The body of a backup's manifest (without its checksum line).
fn read_manifest(repo: &Path, id: &str) -> Value {
    let text = std::fs::read_to_string(repo.join(format!("manifests/{id}.json"))).unwrap();
    let body = &text[..text.trim_end().rfind('\n').unwrap()];
    serde_json::from_str(body).unwrap()
}

fn device_of<'a>(manifest: &'a Value, name: &str) -> &'a Value {
    manifest["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == name)
        .unwrap()
}

/// A device of random data with a hole (its second chunk, never written:
/// sparse), attached.
fn device(d: &Daemon, name: &str, size: u64, seed: u64) -> PathBuf {
    use std::os::unix::fs::FileExt;
    let data = Pattern::Random.bytes(seed, size);
    let path = d.path(name);
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(size).unwrap();
    file.write_all_at(&data[..CHUNK as usize], 0).unwrap();
    if size > 2 * CHUNK {
        file.write_all_at(&data[2 * CHUNK as usize..], 2 * CHUNK)
            .unwrap();
    }
    drop(file);
    d.ok(&["attach", "--device", name]);
    path
}

fn device_result<'a>(result: &'a Value, name: &str) -> &'a Value {
    result["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in {result}"))
}

/// Restores `device` of backup `id` to a new file; asserts it equals `want`.
fn restores_to(d: &Daemon, repo: &Path, id: &str, device: &str, want: &[u8]) {
    let to = d.path(&format!("restored-{id}-{device}"));
    ok(
        d,
        repo,
        &[
            "restore",
            "--id",
            id,
            "--device",
            device,
            "--to",
            to.to_str().unwrap(),
        ],
    );
    let got = std::fs::read(&to).unwrap();
    assert!(
        got == want,
        "{device} of {id} restored differs from its take"
    );
    std::fs::remove_file(&to).unwrap();
}

#[test]
fn full_then_incremental_backups_restore_every_point_and_verify_catches_damage() {
    if !have("qemu-io") {
        return;
    }
    let d = Daemon::start();
    let repo = d.path("repo");
    let (a, b) = (
        device(&d, "a.img", 24 * MIB, 1),
        device(&d, "b.img", 9 * MIB + 4096, 2),
    );
    let full = ok(
        &d,
        &repo,
        &["create", "--device", "a.img", "--device", "b.img"],
    );
    let (a0, b0) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    for name in ["a.img", "b.img"] {
        let dev = device_result(&full, name);
        assert_eq!(dev["mode"], "full", "{full}");
        assert!(
            dev["reason"]
                .as_str()
                .unwrap()
                .contains("no earlier backup"),
            "{full}"
        );
    }
    // The hole of a.img (chunk 1) is not read.
    assert_eq!(
        device_result(&full, "a.img")["stats"]["bytes_read"],
        24 * MIB - CHUNK
    );
    assert_eq!(
        d.ok(&["snapshot_collect"]).trim(),
        "",
        "the snapshot was destroyed"
    );

    // Writes into two chunks of a.img and one of b.img.
    nbd_write(&d, "a.img", &[(100, 4096), (5 * CHUNK + 7, 1000)], 0x61);
    nbd_write(&d, "b.img", &[(2 * CHUNK, 512)], 0x62);
    let inc = ok(
        &d,
        &repo,
        &["create", "--device", "a.img", "--device", "b.img"],
    );
    let (a1, b1) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    let da = device_result(&inc, "a.img");
    assert_eq!(da["mode"], "incremental", "{inc}");
    let manifest = read_manifest(&repo, inc["id"].as_str().unwrap());
    let block = |name: &str| device_of(&manifest, name)["block_size"].as_u64().unwrap();
    assert_eq!(
        da["stats"]["bytes_read"],
        2 * block("a.img"),
        "only the two changed blocks are read"
    );
    assert_eq!(da["stats"]["chunks_reused"], 4);
    assert_eq!(da["stats"]["regions_patched"], 2);
    let db = device_result(&inc, "b.img");
    assert_eq!(db["mode"], "incremental");
    assert_eq!(db["stats"]["bytes_read"], block("b.img"));

    ok(&d, &repo, &["verify"]);
    let (id0, id1) = (full["id"].as_str().unwrap(), inc["id"].as_str().unwrap());
    let list = ok(&d, &repo, &["list"]);
    let ids: Vec<&str> = list["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [id0, id1]);
    restores_to(&d, &repo, id0, "a.img", &a0);
    restores_to(&d, &repo, id0, "b.img", &b0);
    restores_to(&d, &repo, id1, "a.img", &a1);
    restores_to(&d, &repo, id1, "b.img", &b1);

    // A flipped byte in the chunk that only the incremental of b.img holds:
    // the patch of the block written in its last (short) region.
    let bdev = device_of(&manifest, "b.img");
    let chunk = bdev["chunks"][2]["patches"][0][2].as_str().unwrap();
    let path = repo.join("chunks").join(&chunk[..2]).join(chunk);
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let (out, lines) = backup(&d, &repo, &["verify"]);
    assert_eq!(out.status.code(), Some(1));
    let damage = lines.last().unwrap()["damage"].as_array().unwrap().clone();
    assert_eq!(damage.len(), 1, "{damage:?}");
    assert_eq!(damage[0]["backup"], id1);
    assert_eq!(damage[0]["device"], "b.img");
    assert_eq!(
        damage[0]["range"],
        serde_json::json!([2 * CHUNK, block("b.img")])
    );
    ok(&d, &repo, &["verify", "--id", id0]);
    let to = d.path("damaged.img");
    fails(
        &d,
        &repo,
        &[
            "restore",
            "--id",
            id1,
            "--device",
            "b.img",
            "--to",
            to.to_str().unwrap(),
        ],
        &[
            "b.img",
            &format!("bytes {}..{}", 2 * CHUNK, 2 * CHUNK + block("b.img")),
        ],
    );

    // A truncated manifest is damage too, named by its backup.
    let mpath = repo.join(format!("manifests/{id0}.json"));
    let text = std::fs::read(&mpath).unwrap();
    std::fs::write(&mpath, &text[..text.len() / 2]).unwrap();
    let (out, lines) = backup(&d, &repo, &["verify", "--id", id0]);
    assert_eq!(out.status.code(), Some(1));
    let damage = &lines.last().unwrap()["damage"][0];
    assert_eq!(damage["backup"], id0);
    assert!(
        damage["what"].as_str().unwrap().contains("checksum line"),
        "{damage}"
    );
}

#[test]
fn a_new_generation_gives_a_full_backup_with_its_reason() {
    if !have("qemu-io") {
        return;
    }
    let mut d = Daemon::start();
    let repo = d.path("repo");
    device(&d, "g.img", 12 * MIB, 3);
    ok(&d, &repo, &["create", "--device", "g.img"]);
    nbd_write(&d, "g.img", &[(0, 4096)], 0x71);
    // A crash of the daemon: the change maps start over.
    let dir = d.kill();
    let d = Daemon::start_in(dir, &[]);
    let r = ok(&d, &repo, &["create", "--device", "g.img"]);
    let dev = device_result(&r, "g.img");
    assert_eq!(dev["mode"], "full", "{r}");
    assert!(
        dev["reason"]
            .as_str()
            .unwrap()
            .contains("generation_reason=unclean-stop"),
        "{r}"
    );
    // Everything is read again: the unchanged chunk is found in the
    // repository, the hole is a hole, the chunk written before the crash
    // is new.
    assert_eq!(dev["stats"]["chunks_deduplicated"], 1);
    assert_eq!(dev["stats"]["chunks_zero"], 1);
}

#[test]
fn a_killed_backup_leaves_no_snapshot_and_a_valid_repository() {
    let d = Daemon::start();
    let repo = d.path("repo");
    let size = 192 * MIB;
    std::fs::write(d.path("k.img"), Pattern::Random.bytes(4, size)).unwrap();
    d.ok(&["attach", "--device", "k.img"]);
    let mut child = Command::new(blksnap_backup())
        .args(["--json", "--repo"])
        .arg(&repo)
        .arg("--control")
        .arg(&d.control)
        .args(["create", "--device", "k.img", "--connections", "1"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Killed at its first progress report: mid-backup, chunks stored.
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("\"progress\""), "{line}");
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        common::wait_until(std::time::Duration::from_secs(10), || d
            .ok(&["snapshot_collect"])
            .trim()
            .is_empty()),
        "the killed backup's snapshot is still there"
    );
    let list = ok(&d, &repo, &["list"]);
    assert_eq!(
        list["backups"],
        serde_json::json!([]),
        "the partial backup is invisible"
    );
    ok(&d, &repo, &["verify"]);
    let r = ok(&d, &repo, &["create", "--device", "k.img"]);
    assert_eq!(device_result(&r, "k.img")["mode"], "full");
    ok(&d, &repo, &["verify"]);
}

#[test]
fn bad_input_is_refused_clearly() {
    let d = Daemon::start();
    let file = d.path("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    fails(
        &d,
        &file,
        &["create", "--device", "x"],
        &["not-a-dir", "not a directory"],
    );
    let repo = d.path("repo");
    fails(
        &d,
        &repo,
        &["create", "--device", "nothing.img"],
        &["nothing.img"],
    );
    let never = d.path("never");
    fails(&d, &never, &["list"], &["never"]);
    std::fs::create_dir(&never).unwrap();
    std::fs::write(never.join("other"), b"x").unwrap();
    fails(&d, &never, &["list"], &["not a blksnap-backup repository"]);
    device(&d, "c.img", 4 * MIB, 5);
    let r = ok(&d, &repo, &["create", "--device", "c.img"]);
    let id = r["id"].as_str().unwrap();
    fails(
        &d,
        &repo,
        &[
            "restore",
            "--id",
            "20990101T000000.000000Z-00000000",
            "--device",
            "c.img",
            "--to",
            "/tmp/x",
        ],
        &["no backup 20990101T000000.000000Z-00000000"],
    );
    fails(
        &d,
        &repo,
        &["restore", "--id", id, "--device", "nope", "--to", "/tmp/x"],
        &["no device nope", "c.img"],
    );
    let existing = d.path("existing.img");
    std::fs::write(&existing, b"keep me").unwrap();
    fails(
        &d,
        &repo,
        &[
            "restore",
            "--id",
            id,
            "--device",
            "c.img",
            "--to",
            existing.to_str().unwrap(),
        ],
        &["exists"],
    );
    assert_eq!(std::fs::read(&existing).unwrap(), b"keep me");
}

#[test]
fn prune_keeps_the_newest_backups_and_only_the_chunks_they_use() {
    if !have("qemu-io") {
        return;
    }
    let d = Daemon::start();
    let repo = d.path("repo");
    let path = device(&d, "p.img", 16 * MIB, 6);
    let count_chunks = || walk_files(&repo.join("chunks"));
    for round in 0..3u8 {
        nbd_write(
            &d,
            "p.img",
            &[(u64::from(round) * 4096, 4096)],
            0x30 + round,
        );
        ok(&d, &repo, &["create", "--device", "p.img"]);
    }
    let last = std::fs::read(&path).unwrap();
    let before = count_chunks();
    let r = ok(&d, &repo, &["prune", "--keep-last", "1"]);
    assert_eq!(r["stats"]["backups_removed"], 2);
    // Block 0 changed in every round: the middle round's patch of it goes;
    // the full backup's chunk stays, the newest patches over it.
    assert_eq!(r["stats"]["chunks_removed"], 1);
    assert_eq!(count_chunks(), before - 1);
    let list = ok(&d, &repo, &["list"]);
    let backups = list["backups"].as_array().unwrap();
    assert_eq!(backups.len(), 1);
    ok(&d, &repo, &["verify"]);
    let id = backups[0]["id"].as_str().unwrap().to_string();
    restores_to(&d, &repo, &id, "p.img", &last);
    // The next backup is still incremental against the one kept.
    nbd_write(&d, "p.img", &[(8 * MIB, 4096)], 0x40);
    let r = ok(&d, &repo, &["create", "--device", "p.img"]);
    assert_eq!(device_result(&r, "p.img")["mode"], "incremental");
}

/// Regular files under `dir`, recursively.
fn walk_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            if e.file_type().unwrap().is_dir() {
                walk_files(&e.path())
            } else {
                1
            }
        })
        .sum()
}

/// The images read over NBD on TCP (`--nbd-tcp`), as from another host.
#[test]
fn images_can_be_read_over_tcp() {
    let port = common::free_port();
    let addr = format!("127.0.0.1:{port}");
    let d = Daemon::start_with(&["--nbd-tcp", &addr]);
    let repo = d.path("repo");
    let path = device(&d, "t.img", 12 * MIB, 7);
    // Without the Unix socket, only TCP reaches the images.
    std::fs::remove_file(&d.nbd).unwrap();
    fails(&d, &repo, &["create", "--device", "t.img"], &["nbd.sock"]);
    let r = ok(
        &d,
        &repo,
        &["create", "--device", "t.img", "--nbd-tcp", &addr],
    );
    assert_eq!(device_result(&r, "t.img")["mode"], "full");
    let id = r["id"].as_str().unwrap().to_string();
    restores_to(&d, &repo, &id, "t.img", &std::fs::read(&path).unwrap());
    fails(
        &d,
        &repo,
        &["create", "--device", "t.img", "--nbd-tcp", "nowhere"],
        &["not HOST:PORT"],
    );
}

/// Issue 13: the images read over NBD on TCP with TLS required by the
/// daemon (and client certificates checked), as a backup from another host
/// would: `--nbd-tls-certificates DIR` in qemu's layout. Without it the
/// backup fails, naming TLS; with a directory lacking the CA, named.
#[test]
fn images_can_be_read_over_tls() {
    if !have("openssl") {
        return;
    }
    let port = common::free_port();
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = blksnap_test_support::pki::TestPki::generate(pki_dir.path());
    let addr = format!("localhost:{port}");
    let mut options = vec!["--nbd-tcp".to_string(), format!("127.0.0.1:{port}")];
    options.extend(pki.server_options());
    let d = Daemon::start_with(&options.iter().map(String::as_str).collect::<Vec<_>>());
    let repo = d.path("repo");
    let path = device(&d, "t.img", 12 * MIB, 8);
    std::fs::remove_file(&d.nbd).unwrap();
    fails(
        &d,
        &repo,
        &["create", "--device", "t.img", "--nbd-tcp", &addr],
        &["TLS"],
    );
    let create = |certificates: &Path| {
        let dir = certificates.to_str().unwrap().to_string();
        let mut args = vec!["create", "--device", "t.img", "--nbd-tcp", &addr];
        args.extend(["--nbd-tls-certificates", &dir]);
        args.into_iter().map(String::from).collect::<Vec<String>>()
    };
    let args = create(&pki.client_dir);
    let r = ok(
        &d,
        &repo,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    assert_eq!(device_result(&r, "t.img")["mode"], "full");
    let id = r["id"].as_str().unwrap().to_string();
    restores_to(&d, &repo, &id, "t.img", &std::fs::read(&path).unwrap());
    let args = create(&d.path("nowhere"));
    fails(
        &d,
        &repo,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        &["--nbd-tls-certificates", "ca-cert.pem"],
    );
}

/// `blksnap-backup serve` running until dropped (SIGTERM, then its exit is
/// checked by [`Served::stop`]).
struct Served {
    child: std::process::Child,
    uri: String,
    uris: Vec<String>,
}

impl Served {
    fn start(d: &Daemon, repo: &Path, id: &str, socket: &Path) -> Served {
        Self::start_with(d, repo, id, socket, &[])
    }

    /// With more `serve` options; `uris` are every URI it printed.
    fn start_with(d: &Daemon, repo: &Path, id: &str, socket: &Path, extra: &[&str]) -> Served {
        let mut child = Command::new(blksnap_backup())
            .arg("--json")
            .arg("--repo")
            .arg(repo)
            .args(["serve", "--id", id, "--nbd-socket"])
            .arg(socket)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut first)
            .unwrap();
        let event: Value = serde_json::from_str(&first)
            .unwrap_or_else(|e| panic!("serve said {first:?} ({e}); daemon log:\n{}", d.log()));
        assert_eq!(event["event"], "serving", "{event}");
        let uris = event["uris"].as_array().unwrap();
        let uris = uris.iter().map(|u| u.as_str().unwrap().to_string());
        let uris: Vec<String> = uris.collect();
        Served {
            child,
            uri: uris[0].clone(),
            uris,
        }
    }

    /// SIGTERM: the server stops cleanly and removes its socket.
    fn stop(mut self, socket: &Path) {
        common::signal(self.child.id(), "TERM");
        let status = self.child.wait().unwrap();
        assert!(status.success(), "serve ended with {status}");
        assert!(!socket.exists(), "serve left its socket behind");
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A served backup reads as its device at the take (an incremental, with
/// patched regions, and its hole), is read-only, keeps prune away, and
/// gives a read error, never wrong data, where a chunk is damaged.
#[test]
fn a_served_backup_reads_as_its_device_at_the_take() {
    if !(have("qemu-io") && have("nbdcopy") && have("nbdinfo")) {
        return;
    }
    let d = Daemon::start();
    let repo = d.path("repo");
    let path = device(&d, "s.img", 3 * CHUNK + 8192, 9);
    ok(&d, &repo, &["create", "--device", "s.img"]);
    nbd_write(
        &d,
        "s.img",
        &[(100, 4096), (2 * CHUNK + 3 * 65536, 70000)],
        0x71,
    );
    let inc = ok(&d, &repo, &["create", "--device", "s.img"]);
    let at_take = std::fs::read(&path).unwrap();
    assert_eq!(device_result(&inc, "s.img")["stats"]["regions_patched"], 2);
    nbd_write(&d, "s.img", &[(0, 65536)], 0x72); // after the take: not served
    let id = inc["id"].as_str().unwrap();
    let socket = d.path("served.sock");
    let served = Served::start(&d, &repo, id, &socket);
    assert!(
        read_all(&d, &served.uri) == at_take,
        "served data differs from the take"
    );
    let allocation = map(&served.uri, "base:allocation");
    assert_eq!(
        allocation,
        [
            (0, CHUNK, 0),
            (CHUNK, CHUNK, 3),
            (2 * CHUNK, CHUNK + 8192, 0)
        ],
        "the never-written second region is a hole"
    );
    let write = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write 0 4096", &served.uri])
        .output()
        .unwrap();
    assert!(
        !write.status.success(),
        "a write to a served backup succeeded"
    );
    fails(
        &d,
        &repo,
        &["prune", "--keep-last", "1"],
        &["busy", "served"],
    );
    served.stop(&socket);

    // Damage in the patch of region 0: that range fails to read.
    let manifest = read_manifest(&repo, id);
    let chunk = device_of(&manifest, "s.img")["chunks"][0]["patches"][0][2]
        .as_str()
        .unwrap()
        .to_string();
    let chunk_path = repo.join("chunks").join(&chunk[..2]).join(&chunk);
    let mut bytes = std::fs::read(&chunk_path).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 1;
    std::fs::write(&chunk_path, &bytes).unwrap();
    let served = Served::start(&d, &repo, id, &socket);
    let read = Command::new("qemu-io")
        .args(["-r", "-f", "raw", "-c", "read 0 4096", &served.uri])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&read.stdout).to_string() + &String::from_utf8_lossy(&read.stderr);
    assert!(
        text.contains("Input/output error") && !text.contains("read 4096/4096"),
        "a damaged chunk was served: {text}"
    );
    let beyond = Command::new("qemu-io")
        .args([
            "-r",
            "-f",
            "raw",
            "-c",
            &format!("read {CHUNK} 4096"),
            &served.uri,
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&beyond.stdout).contains("read 4096/4096"),
        "an undamaged region no longer reads: {beyond:?}"
    );
    served.stop(&socket);
}

/// Issue 13: a backup served on TCP with TLS required reads as its device
/// to a client with a certificate from the CA (an `nbds://` URI), and is
/// refused to one without; a TCP address that is not loopback is refused
/// without TLS required.
#[test]
fn a_backup_is_served_over_tls_to_clients_with_a_certificate() {
    if !(have("nbdcopy") && have("nbdinfo") && have("openssl")) {
        return;
    }
    let d = Daemon::start();
    let repo = d.path("repo");
    let path = device(&d, "t.img", 2 * CHUNK + 4096, 12);
    ok(&d, &repo, &["create", "--device", "t.img"]);
    let id = ok(&d, &repo, &["list"])["backups"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = blksnap_test_support::pki::TestPki::generate(pki_dir.path());
    let socket = d.path("tls.sock");
    let tls = pki.server_options();
    let mut args = vec!["--nbd-tcp", "localhost:0"];
    args.extend(tls.iter().map(String::as_str));
    let served = Served::start_with(&d, &repo, &id, &socket, &args);
    let tcp = served
        .uris
        .iter()
        .find(|u| u.starts_with("nbds://"))
        .unwrap_or_else(|| panic!("no nbds:// URI in {:?}", served.uris))
        .clone();
    let with = |dir: &Path| format!("{tcp}?tls-certificates={}", dir.display());
    let copy = d.path("t.copy");
    run(Command::new("nbdcopy").args([&with(&pki.client_dir), copy.to_str().unwrap()]));
    assert!(std::fs::read(&copy).unwrap() == std::fs::read(&path).unwrap());
    let refused = Command::new("nbdinfo")
        .arg(with(&pki.anonymous_dir))
        .output()
        .unwrap();
    assert!(
        !refused.status.success(),
        "a client without a certificate got in"
    );
    served.stop(&socket);

    fails(
        &d,
        &repo,
        &["serve", "--id", &id, "--nbd-tcp", "0.0.0.0:0"],
        &["not a loopback address", "--nbd-insecure"],
    );
}
