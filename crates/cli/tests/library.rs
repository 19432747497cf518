//! Library parity with the original's libblksnap (issue 16, item 7), in the
//! Rust client against a real daemon: a window of the change map
//! (`ReadCbtMap(offset, length)`), the idempotent attach, the session
//! (`ISession::Create`: attach, create, storage, take; events gathered on a
//! thread; destroyed when dropped) and events that carry their time and
//! device. Writes reach the devices through the daemon's NBD exports (no
//! root needed).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use blksnap_client::{Client, Event, Range, Session, SessionStorage, SnapshotCreateArgs};
use blksnap_engine::monotonic_ns;
use blksnap_nbd::{NbdAddress, NbdClient};
use common::{event_lines, wait_until, Daemon};

const MIB: u64 = 1 << 20;

fn nbd(uri: &str) -> NbdClient {
    let address = NbdAddress::parse(uri).unwrap();
    NbdClient::connect_timeout(&address, &[], Some(Duration::from_secs(30))).unwrap()
}

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A daemon whose copies wait 100 ms (not 5 s) for storage that is full.
fn daemon_with_short_storage_wait() -> (Daemon, tempfile::TempDir) {
    let config_dir = tempfile::tempdir().unwrap();
    let config = config_dir.path().join("blksnapd.toml");
    std::fs::write(&config, "storage_wait_ms = 100\n").unwrap();
    (Daemon::start_with(&["--config", s(&config)]), config_dir)
}

#[test]
fn a_window_of_the_change_map_is_the_slice_of_the_whole_map() {
    let d = Daemon::start();
    let disk = d.image("w.img", 64 * MIB); // 1024 tracking blocks of 64 KiB
    let mut c = Client::connect(&d.control).unwrap();
    c.attach(s(&disk), None).unwrap();
    let create = |c: &mut Client| {
        c.snapshot_create(SnapshotCreateArgs {
            storage: Some(s(d.dir.path()).to_string()),
            limit: None,
            devices: vec!["w.img".into()],
            on_copy_error: None,
            copy_timeout_ms: None,
            storage_wait_ms: None,
            auto_destroy: false,
            overwrite: false,
        })
        .unwrap()
    };
    // Marks under snapshot 1 show in the readable map after take 2: blocks
    // 3, 500 and 1023 (the last) changed.
    let id = create(&mut c);
    c.snapshot_take(id).unwrap();
    let marks = [3u64, 500, 1023].map(|b| Range {
        start: b * 128,
        count: 8,
    });
    c.mark_dirty("w.img", &marks).unwrap();
    c.snapshot_destroy(id).unwrap();
    let id = create(&mut c);
    c.snapshot_take(id).unwrap();

    let whole = c.read_cbt_map("w.img").unwrap();
    assert_eq!(whole.len(), 1024);
    let changed: Vec<usize> = (0..whole.len()).filter(|&b| whole[b] > 1).collect();
    assert_eq!(changed, [3, 500, 1023], "the marks are in the map");
    for (offset, length) in [(0, 1024), (3, 1), (2, 499), (500, 10), (1000, 24), (0, 0)] {
        let (window, count) = c.read_cbt_map_range("w.img", offset, length).unwrap();
        assert_eq!(count, 1024);
        let (o, l) = (offset as usize, length as usize);
        assert_eq!(window, whole[o..o + l], "window {offset}+{length}");
    }
    // A window past the end is cut where the map ends; at the end it is
    // empty; beyond, it is refused.
    let (window, _) = c.read_cbt_map_range("w.img", 1020, 100).unwrap();
    assert_eq!(window, whole[1020..]);
    let (window, _) = c.read_cbt_map_range("w.img", 1024, 8).unwrap();
    assert!(window.is_empty());
    let err = c.read_cbt_map_range("w.img", 1025, 1).unwrap_err();
    assert_eq!(err.errno(), 22, "EINVAL: {err}");
    assert!(err.to_string().contains("1025"), "{err}");
    c.snapshot_destroy(id).unwrap();
}

#[test]
fn attach_idempotent_says_already_attached_in_one_request() {
    let d = Daemon::start();
    let disk = d.image("i.img", 4 * MIB);
    let link = d.path("link.img");
    std::os::unix::fs::symlink(&disk, &link).unwrap();
    let other = d.image("other.img", 4 * MIB);
    let mut c = Client::connect(&d.control).unwrap();

    let first = c.attach_idempotent(s(&disk), Some("disk-i")).unwrap();
    assert_eq!(first.name, "disk-i");
    assert!(!first.already_attached);
    // Again: by the same path, with or without the name, or by a symlink.
    for (path, name) in [
        (&disk, Some("disk-i")),
        (&disk, None),
        (&link, None),
        (&link, Some("disk-i")),
    ] {
        let again = c.attach_idempotent(s(path), name).unwrap();
        assert!(again.already_attached, "{path:?} {name:?}");
        assert_eq!(again.name, "disk-i");
        assert_eq!(again.size, 4 * MIB);
    }
    // Not as asked: another name for the same file, or the name of
    // another file, is still EEXIST; the plain attach is unchanged.
    let err = c.attach_idempotent(s(&disk), Some("other")).unwrap_err();
    assert_eq!(err.errno(), 17, "EEXIST: {err}");
    let err = c.attach_idempotent(s(&other), Some("disk-i")).unwrap_err();
    assert_eq!(err.errno(), 17, "EEXIST: {err}");
    let err = c.attach(s(&disk), Some("disk-i")).unwrap_err();
    assert_eq!(err.errno(), 17, "EEXIST: {err}");
    let devices = c.list().unwrap().devices;
    assert_eq!(devices.len(), 1, "{devices:?}");
    assert!(!devices[0].already_attached, "only an attach reply says it");
    // The CLI says the original's words, from the same reply.
    assert!(d
        .ok(&["attach", "--device", s(&link)])
        .starts_with("Already was attached\ndevice=disk-i\n"));
}

#[test]
fn a_session_takes_serves_and_destroys_its_snapshot() {
    let d = Daemon::start();
    let disk = d.image("s.img", 8 * MIB);
    let mut c = Client::connect(&d.control).unwrap();
    c.attach(s(&disk), None).unwrap(); // attached already: fine
    let mut origin = nbd(&d.uri("s.img"));
    origin.write_at(&[0x11; 4096], MIB).unwrap();
    origin.flush().unwrap();

    let storage = d.path("diff");
    std::fs::create_dir(&storage).unwrap();
    let session = Session::create(
        &d.control,
        &[s(&disk)],
        SessionStorage::Path(s(&storage).into()),
        Some(4 << 30),
    )
    .unwrap();
    let id = session.id();
    assert_eq!(c.snapshot_collect().unwrap(), [id]);
    assert_eq!(session.devices(), ["s.img"]);
    let info = c.snapshot_info(id).unwrap();
    assert!(info.taken);
    assert_eq!(info.storage.limit, Some(4 << 30));
    let image = session.image(s(&disk)).expect("the image, by path");
    assert_eq!(session.image("s.img"), Some(image), "and by name");
    assert_eq!(image.size, 8 * MIB);
    let uri = image.nbd.clone().expect("an NBD export of the image");

    // A write to the origin after the take: the image keeps the old data.
    origin.write_at(&[0x22; 4096], MIB).unwrap();
    origin.flush().unwrap();
    let mut buf = vec![0; 4096];
    nbd(&uri).read_at(&mut buf, MIB).unwrap();
    assert!(buf.iter().all(|&b| b == 0x11), "the image changed");
    assert_eq!(session.error(), None);
    assert!(
        !session
            .events()
            .iter()
            .any(|e| matches!(e.event, Event::Corrupted { .. })),
        "{:?}",
        session.events()
    );

    drop(session);
    assert!(
        c.snapshot_collect().unwrap().is_empty(),
        "the snapshot outlived its session"
    );
    let devices = c.list().unwrap().devices;
    assert_eq!(devices.len(), 1, "the device stays attached");
    // Its tracking went on: the write after the take is in the next map.
    assert_eq!(c.cbtinfo("s.img").unwrap().changes_number, 1);

    // All or nothing: a session that cannot be taken leaves no snapshot.
    let err = Session::create(
        &d.control,
        &[s(&disk), "no-such-device"],
        SessionStorage::Path(s(&storage).into()),
        None,
    )
    .unwrap_err();
    assert_eq!(err.errno(), 2, "ENOENT: {err}");
    assert!(c.snapshot_collect().unwrap().is_empty());
}

#[test]
fn an_overflow_is_the_session_error_with_its_device_and_time() {
    let (d, _config) = daemon_with_short_storage_wait();
    let disk = d.image("o.img", 16 * MIB);
    let room = d.image("room.img", MIB);
    let before = monotonic_ns();
    // 256 KiB of storage: one chunk.
    let session = Session::create(
        &d.control,
        &[s(&disk)],
        SessionStorage::Ranges {
            device: s(&room).into(),
            ranges: vec![Range {
                start: 0,
                count: 512,
            }],
        },
        None,
    )
    .unwrap();
    let mut origin = nbd(&d.uri("o.img"));
    for chunk in 0..4u64 {
        origin.write_at(&[0x33; 4096], chunk * 4 * MIB).unwrap();
    }
    origin.flush().unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || session.error().is_some()),
        "no error after the overflow: {:?}",
        session.events()
    );
    let error = session.error().unwrap();
    let after = monotonic_ns();
    assert_eq!(error.errno, 28, "ENOSPC: {error:?}");
    assert_eq!(error.device.as_deref(), Some("o.img"));
    assert!(error.message.contains("o.img"), "{}", error.message);
    assert!(
        before < error.time && error.time < after,
        "time {} not within {before}..{after}",
        error.time
    );
    // The events: no_space (the shared storage: no device), then
    // corrupted (the device), in time order.
    let events = session.events();
    let no_space = events
        .iter()
        .find(|e| matches!(e.event, Event::NoSpace { .. }))
        .expect("no_space");
    assert_eq!(no_space.event.device(), None);
    let corrupted = events
        .iter()
        .find(|e| matches!(e.event, Event::Corrupted { .. }))
        .expect("corrupted");
    assert_eq!(corrupted.event.device(), Some("o.img"));
    assert!(no_space.time <= corrupted.time);
    assert_eq!(session.error(), session.errors().first().cloned());
    drop(session);
    let mut c = Client::connect(&d.control).unwrap();
    assert!(c.snapshot_collect().unwrap().is_empty());
}

#[test]
fn the_cli_time_of_an_event_is_when_it_happened() {
    let (d, _config) = daemon_with_short_storage_wait();
    let disk = d.image("t.img", 16 * MIB);
    let room = d.image("room.img", MIB);
    d.ok(&["attach", "--device", s(&disk)]);
    let id = d
        .ok(&["snapshot_create", "--device", "t.img"])
        .trim()
        .to_string();
    d.ok(&[
        "snapshot_appendstorage",
        "--id",
        &id,
        "--device",
        s(&room),
        "--range",
        "0:512",
    ]);
    d.ok(&["snapshot_take", "--id", &id]);
    let started = monotonic_ns();
    let mut origin = nbd(&d.uri("t.img"));
    origin.write_at(&[0x44; 4096], 0).unwrap();
    origin.write_at(&[0x44; 4096], 4 * MIB).unwrap();
    origin.flush().unwrap();
    let written = monotonic_ns();
    // The events wait in the queue while time passes.
    std::thread::sleep(Duration::from_millis(300));
    let asked = Instant::now();
    let mut seen = Vec::new();
    while seen.len() < 2 && asked.elapsed() < Duration::from_secs(10) {
        let out = d.ok(&["snapshot_waitevent", "--id", &id, "--timeout", "1000"]);
        if event_lines(&out) == ["event=none"] {
            continue;
        }
        let time: i64 = out
            .lines()
            .find_map(|l| l.strip_prefix("time="))
            .unwrap()
            .parse()
            .unwrap();
        seen.push((time, event_lines(&out)));
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0].1[0], "event=no_space", "{seen:?}");
    assert_eq!(
        seen[1].1[..2],
        ["event=corrupted", "device=t.img"],
        "{seen:?}"
    );
    for (time, _) in &seen {
        // Stamped when queued (within the writes and the 100 ms wait), not
        // when the tool read it, 300 ms later.
        assert!(
            started < *time && *time < written + 200_000_000,
            "time={time}: not between {started} and {written} + 200 ms"
        );
    }
    d.ok(&["snapshot_destroy", "--id", &id]);
}
