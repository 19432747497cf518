//! Behaviour of the engine at its edges: chunk borders, overflow of the
//! difference storage, the failure policies and copy timeout, change tracking
//! while a snapshot is held and at the wrap, the image-read race guard, and
//! the errors of the control operations.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use blksnap_engine::{
    BlockDevice, Config, CopyErrorPolicy, Engine, Error, Event, MemDevice, SectorRange,
    SnapshotOptions, StorageSpec,
};
use blksnap_test_support::{changed_since, Pattern};
use common::{drain_events, mem_storage, on_copy_error, snapshot_of, snapshot_one, wait_events};
use uuid::Uuid;

mod common;

const KIB: u64 = 1024;
const CHUNK: u64 = 256 * KIB;

fn read_all(read: impl Fn(&mut [u8], u64) -> blksnap_engine::Result<()>, size: u64) -> Vec<u8> {
    let mut buf = vec![0; size as usize];
    read(&mut buf, 0).unwrap();
    buf
}

/// An engine with one in-memory device `name` of `size` bytes, filled with a
/// known pattern that is returned.
fn setup(engine: &Engine, name: &str, size: u64) -> Vec<u8> {
    let device = Arc::new(MemDevice::new(size));
    let data = Pattern::RandomNonZero.bytes(size ^ name.len() as u64, size);
    device.write_at(&data, 0).unwrap();
    engine.attach(name, device).unwrap();
    data
}

#[test]
fn chunk_borders_keep_neighbours_intact() {
    let engine = Engine::new(Config::default()).unwrap();
    // 8 full chunks and a short last one of 3 sectors.
    let size = 8 * CHUNK + 3 * 512;
    let before = setup(&engine, "d", size);
    snapshot_one(&engine, "d", mem_storage(16 * CHUNK));
    let device = engine.device("d").unwrap();
    let image = engine.image("d").unwrap();
    assert_eq!(image.chunk_size(), CHUNK);
    let mut origin = before.clone();
    let mut expected_image = before.clone();
    let sector = |v: u8| vec![v; 512];
    // Origin: first and last sector of chunk 1, a 2-sector write across the
    // border of chunks 3 and 4, the last sector of the short last chunk.
    let origin_writes = [
        (CHUNK, 0xA1),
        (2 * CHUNK - 512, 0xA2),
        (4 * CHUNK - 512, 0xA3),
        (4 * CHUNK, 0xA3),
        (size - 512, 0xA4),
    ];
    for (at, v) in origin_writes {
        device.write(&sector(v), at).unwrap();
        origin[at as usize..at as usize + 512].fill(v);
    }
    // Image: the same shapes on other chunks, and over an origin-written one.
    let image_writes = [
        (5 * CHUNK, 0xB1),
        (6 * CHUNK - 512, 0xB2),
        (7 * CHUNK - 512, 0xB3),
        (7 * CHUNK, 0xB3),
        (CHUNK + 512, 0xB4),
        (size - 1024, 0xB5),
    ];
    for (at, v) in image_writes {
        image.write(&sector(v), at).unwrap();
        expected_image[at as usize..at as usize + 512].fill(v);
    }
    assert!(
        read_all(|b, o| device.read(b, o), size) == origin,
        "origin neighbours changed"
    );
    assert!(
        read_all(|b, o| image.read(b, o), size) == expected_image,
        "image neighbours changed"
    );
    // A 2-sector read across a border sees both sides.
    let mut two = vec![0; 1024];
    image.read(&mut two, 4 * CHUNK - 512).unwrap();
    assert_eq!(
        two,
        before[(4 * CHUNK - 512) as usize..(4 * CHUNK + 512) as usize]
    );
}

#[test]
fn overflow_corrupts_the_image_and_keeps_every_origin_write() {
    let engine = Engine::new(Config::default()).unwrap();
    let size = 32 * CHUNK;
    setup(&engine, "small", size);
    // Room for 4 chunks; 16 chunks will be written.
    let id = snapshot_one(&engine, "small", mem_storage(4 * CHUNK));
    let device = engine.device("small").unwrap();
    let image = engine.image("small").unwrap();
    let mut expected = read_all(|b, o| device.read(b, o), size);
    for chunk in 0..16 {
        let data = Pattern::RandomNonZero.bytes(chunk, 4 * KIB);
        let at = chunk * 2 * CHUNK + 1000;
        device
            .write(&data, at)
            .expect("the origin write always proceeds");
        expected[at as usize..at as usize + data.len()].copy_from_slice(&data);
    }
    assert!(read_all(|b, o| device.read(b, o), size) == expected);
    let events = wait_events(&engine, &id, Duration::from_millis(10));
    assert!(
        events.contains(&Event::Corrupted {
            device: "small".into(),
            errno: 28
        }),
        "{events:?}"
    );
    assert!(
        matches!(events[0], Event::NoSpace { requested_sectors } if requested_sectors == (1 << 30) / 512)
    );
    let err = image.read(&mut [0; 512], 0).unwrap_err();
    assert_eq!(err.errno(), 5);
    let message = err.to_string();
    assert!(
        message.contains("small") && message.contains("corrupted") && message.contains("full"),
        "{message}"
    );
    assert_eq!(engine.snapshot_info(&id).unwrap().images[0].error_code, 28);
    // The corruption is final: writes go on without copies.
    device.write(&[7; 512], 0).unwrap();
    assert!(
        matches!(
            image.read(&mut [0; 512], 0),
            Err(Error::Corrupted { errno: 28, .. })
        ),
        "the image stays corrupted with ENOSPC"
    );
    engine.snapshot_destroy(&id).unwrap();
    device.write(&[8; 512], 0).unwrap();
}

#[test]
fn break_policy_fails_the_origin_write_and_keeps_the_image() {
    let engine = Engine::new(Config::default()).unwrap();
    let before = setup(&engine, "d", 8 * CHUNK);
    let options = SnapshotOptions {
        storage_wait: Some(Duration::ZERO),
        ..on_copy_error(CopyErrorPolicy::BreakOriginWrite)
    };
    // Room for one chunk: the take needs that much.
    let id = snapshot_of(&engine, &["d"], mem_storage(CHUNK), options);
    let device = engine.device("d").unwrap();
    device.write(&[1; 512], 0).unwrap();
    let mut expected = before.clone();
    expected[..512].fill(1);
    let err = device.write(&[1; 512], CHUNK).unwrap_err();
    assert_eq!(err.errno(), 28, "{err}");
    assert!(err.to_string().contains("write refused"), "{err}");
    assert!(
        read_all(|b, o| device.read(b, o), 8 * CHUNK) == expected,
        "a refused write reached the origin"
    );
    // Storage appended after the take is used at once.
    let backing: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(4 * CHUNK));
    engine
        .snapshot_append_storage_device(&id, backing.clone(), &[SectorRange::new(0, CHUNK / 512)])
        .unwrap();
    device.write(&[1; 512], CHUNK).unwrap();
    let image = engine.image("d").unwrap();
    assert!(read_all(|b, o| image.read(b, o), 8 * CHUNK) == before);
    let mut stored = vec![0; CHUNK as usize];
    backing.read_at(&mut stored, 0).unwrap();
    assert!(
        stored == before[CHUNK as usize..2 * CHUNK as usize],
        "the copy is not in the appended range"
    );
    assert_eq!(image.error_code(), 0);
}

#[test]
fn storage_io_error_corrupts_by_default() {
    let engine = Engine::new(Config::default()).unwrap();
    setup(&engine, "d", 4 * CHUNK);
    let storage = Arc::new(MemDevice::new(8 * CHUNK));
    let id = snapshot_one(&engine, "d", StorageSpec::Device(storage.clone()));
    let device = engine.device("d").unwrap();
    device.write(&[1; 512], 0).unwrap();
    storage.set_fail_writes(true);
    device.write(&[2; 512], CHUNK).unwrap();
    assert_eq!(engine.snapshot_info(&id).unwrap().images[0].error_code, 5);
    // A fixed storage far below half a growth step also warned no_space.
    let events = drain_events(&engine, &id);
    assert_eq!(
        events.last(),
        Some(&Event::Corrupted {
            device: "d".into(),
            errno: 5
        }),
        "{events:?}"
    );
    let mut buf = [0; 512];
    assert_eq!(device.read(&mut buf, CHUNK).map(|_| buf[0]).unwrap(), 2);
}

/// A storage device whose writes park until [`StallingStore::release`]: a
/// copy that cannot finish until the test says so, without timing.
#[derive(Debug)]
struct StallingStore {
    inner: MemDevice,
    /// (stalled, writes parked now)
    state: Mutex<(bool, u32)>,
    cv: Condvar,
}

impl StallingStore {
    fn new(size: u64) -> Self {
        Self {
            inner: MemDevice::new(size),
            state: Mutex::new((false, 0)),
            cv: Condvar::new(),
        }
    }
    fn stall(&self) {
        self.state.lock().unwrap().0 = true;
    }
    fn release(&self) {
        self.state.lock().unwrap().0 = false;
        self.cv.notify_all();
    }
    /// Waits (bounded) until a write is parked.
    fn wait_parked(&self) {
        let s = self.state.lock().unwrap();
        let (s, timeout) = self
            .cv
            .wait_timeout_while(s, Duration::from_secs(20), |s| s.1 == 0)
            .unwrap();
        assert!(
            !timeout.timed_out() || s.1 > 0,
            "the copy never reached the storage"
        );
    }
}

impl BlockDevice for StallingStore {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut s = self.state.lock().unwrap();
        s.1 += 1;
        self.cv.notify_all();
        while s.0 {
            s = self.cv.wait(s).unwrap();
        }
        s.1 -= 1;
        drop(s);
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.write_zeroes(offset, len)
    }
}

/// The copy timeout bounds the writer's wait: the copy is parked in the
/// storage until the test releases it, so a writer that returns at all did
/// not wait for the copy (no wall-clock assertion, no sleep).
#[test]
fn copy_timeout_follows_the_policy() {
    for policy in [
        CopyErrorPolicy::KeepOriginWrites,
        CopyErrorPolicy::BreakOriginWrite,
    ] {
        let engine = Arc::new(Engine::new(Config::default()).unwrap());
        let before = setup(&engine, "d", 4 * CHUNK);
        let storage = Arc::new(StallingStore::new(8 * CHUNK));
        let options = SnapshotOptions {
            copy_timeout: Some(Duration::from_millis(30)),
            ..on_copy_error(policy)
        };
        let id = snapshot_of(
            &engine,
            &["d"],
            StorageSpec::Device(storage.clone()),
            options,
        );
        let device = engine.device("d").unwrap();
        storage.stall();
        let (tx, rx) = std::sync::mpsc::channel();
        let writer = {
            let device = device.clone();
            thread::spawn(move || tx.send(device.write(&[1; 512], 0)).unwrap())
        };
        // Generous: the timeout is 30 ms; the copy stays parked until released.
        let result = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the writer waited for the parked copy instead of timing out");
        writer.join().unwrap();
        storage.wait_parked();
        let image = engine.image("d").unwrap();
        match policy {
            CopyErrorPolicy::KeepOriginWrites => {
                result.unwrap();
                assert_eq!(image.error_code(), 110);
                assert!(
                    matches!(
                        image.read(&mut [0; 512], 0),
                        Err(Error::Corrupted { errno: 110, .. })
                    ),
                    "a timed-out copy corrupts the image with ETIMEDOUT"
                );
                storage.release();
            }
            CopyErrorPolicy::BreakOriginWrite => {
                assert_eq!(result.unwrap_err().errno(), 110);
                let mut origin = [0; 512];
                device.read(&mut origin, 0).unwrap();
                assert_eq!(
                    origin[..],
                    before[..512],
                    "the refused write reached the origin"
                );
                storage.release();
                // The copy finishes in the background; until then a write
                // may time out again (ETIMEDOUT only, origin unchanged).
                let deadline = Instant::now() + Duration::from_secs(20);
                loop {
                    match device.write(&[1; 512], 0) {
                        Ok(()) => break,
                        Err(e) if e.errno() == 110 && Instant::now() < deadline => {
                            device.read(&mut origin, 0).unwrap();
                            assert_eq!(
                                origin[..],
                                before[..512],
                                "a refused write reached the origin"
                            );
                        }
                        Err(e) => panic!("write after the copy finished: {e}"),
                    }
                }
                assert_eq!(image.error_code(), 0);
                assert!(read_all(|b, o| image.read(b, o), 4 * CHUNK) == before);
            }
        }
        engine.snapshot_destroy(&id).unwrap();
    }
}

#[test]
fn readable_map_is_frozen_while_held_but_for_image_writes_and_mark_dirty() {
    let config = Config {
        tracking_block_minimum_shift: 16,
        ..Config::default()
    };
    let engine = Engine::new(config).unwrap();
    setup(&engine, "d", 64 * 64 * KIB);
    let device = engine.device("d").unwrap();
    device.write(&[1; 100], 3 * 64 * KIB).unwrap();
    device.write_zeroes(10 * 64 * KIB - 1, 2).unwrap();
    device.discard(20 * 64 * KIB, 0).unwrap();
    let id = snapshot_one(&engine, "d", mem_storage(128 * 64 * KIB));
    let held = engine.read_cbt_map("d").unwrap();
    let mut expected = vec![0u8; 64];
    expected[3] = 1;
    expected[9] = 1;
    expected[10] = 1;
    assert_eq!(held, expected);
    let info = engine.cbt_info("d").unwrap();
    assert_eq!(
        (info.changes_number, info.current_number, info.block_size),
        (1, 2, 65536)
    );
    // Writes go on; the readable map does not move but for the image's own
    // writes and mark-dirty, which a consumer of this snapshot must see
    // (marked with the snapshot's change number, as the original does).
    device.write(&[1; 512], 30 * 64 * KIB).unwrap();
    device.discard(31 * 64 * KIB, 64 * KIB).unwrap();
    engine
        .image("d")
        .unwrap()
        .write(&[9; 512], 40 * 64 * KIB)
        .unwrap();
    engine
        .mark_dirty(
            "d",
            &[
                SectorRange::new(50 * 128, 1),
                SectorRange::new(60 * 128 - 1, 2),
            ],
        )
        .unwrap();
    let mut held = held;
    for b in [40, 50, 59, 60] {
        held[b] = 1;
    }
    assert_eq!(engine.read_cbt_map("d").unwrap(), held);
    engine.snapshot_destroy(&id).unwrap();
    assert_eq!(engine.read_cbt_map("d").unwrap(), held);
    snapshot_one(&engine, "d", mem_storage(128 * 64 * KIB));
    for b in [30, 31, 40, 50, 59, 60] {
        expected[b] = 2;
    }
    assert_eq!(engine.read_cbt_map("d").unwrap(), expected);
    // Consumer rule: changed since backup 1 iff byte > 1.
    assert_eq!(changed_since(&expected, 1), [30, 31, 40, 50, 59, 60]);
    // Out-of-range mark-dirty is refused whole.
    let err = engine
        .mark_dirty("d", &[SectorRange::new(0, 1), SectorRange::new(8192, 1)])
        .unwrap_err();
    assert_eq!(err.errno(), 22);
}

#[test]
fn change_number_wrap_makes_a_new_generation() {
    let engine = Engine::new(Config::default()).unwrap();
    setup(&engine, "d", 4 * CHUNK);
    let device = engine.device("d").unwrap();
    let generation = engine.cbt_info("d").unwrap().generation_id;
    for n in 1..=254u32 {
        device.write(&[1; 512], (n as u64 % 4) * CHUNK).unwrap();
        let id = snapshot_one(&engine, "d", mem_storage(CHUNK));
        engine.snapshot_destroy(&id).unwrap();
        let info = engine.cbt_info("d").unwrap();
        assert_eq!(
            (info.changes_number as u32, info.current_number as u32),
            (n, n + 1)
        );
        assert_eq!(info.generation_id, generation);
    }
    device.write(&[1; 512], 0).unwrap();
    let id = snapshot_one(&engine, "d", mem_storage(CHUNK));
    let info = engine.cbt_info("d").unwrap();
    assert_ne!(info.generation_id, generation);
    assert_eq!((info.changes_number, info.current_number), (0, 1));
    assert!(engine.read_cbt_map("d").unwrap().iter().all(|&b| b == 0));
    engine.snapshot_destroy(&id).unwrap();
    device.write(&[1; 512], CHUNK).unwrap();
    snapshot_one(&engine, "d", mem_storage(CHUNK));
    assert_eq!(
        engine.read_cbt_map("d").unwrap()[..8],
        [0, 0, 0, 0, 1, 0, 0, 0]
    );
}

/// A device whose next read of a chosen offset blocks until released, to
/// force an image read to race with a copy-before-write.
#[derive(Debug)]
struct GatedDevice {
    inner: MemDevice,
    gate_offset: Mutex<Option<u64>>,
    state: Mutex<(bool, bool)>, // (a read is parked, released)
    cv: Condvar,
}

impl GatedDevice {
    fn wait_parked(&self) {
        let mut s = self.state.lock().unwrap();
        while !s.0 {
            s = self.cv.wait(s).unwrap();
        }
    }
    fn release(&self) {
        self.state.lock().unwrap().1 = true;
        self.cv.notify_all();
    }
}

impl BlockDevice for GatedDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self
            .gate_offset
            .lock()
            .unwrap()
            .take_if(|o| *o == offset)
            .is_some()
        {
            let mut s = self.state.lock().unwrap();
            s.0 = true;
            self.cv.notify_all();
            while !s.1 {
                s = self.cv.wait(s).unwrap();
            }
        }
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.write_zeroes(offset, len)
    }
}

#[test]
fn image_read_racing_with_a_copy_never_returns_new_data() {
    let engine = Arc::new(Engine::new(Config::default()).unwrap());
    let origin = Arc::new(GatedDevice {
        inner: MemDevice::new(4 * CHUNK),
        gate_offset: Mutex::new(None),
        state: Mutex::new((false, false)),
        cv: Condvar::new(),
    });
    origin.write_at(&[0x11; 4096], CHUNK).unwrap();
    engine.attach("d", origin.clone()).unwrap();
    snapshot_one(&engine, "d", mem_storage(8 * CHUNK));
    let image = engine.image("d").unwrap();
    // The image read of chunk 1 parks inside the origin read, after it saw
    // the chunk untouched.
    *origin.gate_offset.lock().unwrap() = Some(CHUNK + 512);
    let reader = thread::spawn(move || {
        let mut buf = vec![0; 512];
        image.read(&mut buf, CHUNK + 512).unwrap();
        buf
    });
    origin.wait_parked();
    // Meanwhile a writer copies the chunk and overwrites the origin.
    engine
        .device("d")
        .unwrap()
        .write(&[0x22; 4096], CHUNK)
        .unwrap();
    origin.release();
    assert_eq!(
        reader.join().unwrap(),
        vec![0x11; 512],
        "image read returned data written after the take"
    );
}

#[test]
fn concurrent_writers_of_one_chunk_wait_for_one_copy() {
    let engine = Arc::new(Engine::new(Config::default()).unwrap());
    let before = setup(&engine, "d", 4 * CHUNK);
    let storage = Arc::new(MemDevice::new(16 * CHUNK));
    let id = snapshot_one(&engine, "d", StorageSpec::Device(storage.clone()));
    storage.set_delay(Duration::from_millis(20));
    let go = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..8u64)
        .map(|i| {
            let device = engine.device("d").unwrap();
            let go = go.clone();
            thread::spawn(move || {
                while !go.load(Ordering::Acquire) {
                    std::hint::spin_loop();
                }
                device.write(&[i as u8 + 1; 512], CHUNK + i * 512).unwrap();
            })
        })
        .collect();
    go.store(true, Ordering::Release);
    for w in writers {
        w.join().unwrap();
    }
    let info = engine.snapshot_info(&id).unwrap();
    assert_eq!(info.storage.used, CHUNK, "one chunk copied once");
    let image = engine.image("d").unwrap();
    assert!(read_all(|b, o| image.read(b, o), 4 * CHUNK) == before);
}

#[test]
fn control_errors_name_what_is_wrong() {
    let engine = Engine::new(Config::default()).unwrap();
    setup(&engine, "a", 4 * CHUNK);
    setup(&engine, "b", 4 * CHUNK);
    let err = engine
        .attach("a", Arc::new(MemDevice::new(512)))
        .unwrap_err();
    assert_eq!((err.errno(), err.to_string().contains("a")), (17, true));
    assert_eq!(
        engine
            .attach("x", Arc::new(MemDevice::new(0)))
            .unwrap_err()
            .errno(),
        22
    );
    assert_eq!(
        engine
            .attach("x/y", Arc::new(MemDevice::new(512)))
            .unwrap_err()
            .errno(),
        22
    );
    assert!(matches!(engine.cbt_info("nope"), Err(Error::NotFound(m)) if m.contains("nope")));

    let id = engine
        .snapshot_create(StorageSpec::Empty, SnapshotOptions::default())
        .unwrap();
    assert_eq!(
        engine.snapshot_take(&id).unwrap_err().errno(),
        22,
        "take without devices"
    );
    engine.snapshot_add(&id, "a").unwrap();
    // No storage at all: the first write would corrupt the image.
    let err = engine.snapshot_take(&id).unwrap_err();
    assert_eq!(err.errno(), 28, "{err}");
    assert!(err.to_string().contains("snapshot_appendstorage"), "{err}");
    let storage: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(4 * CHUNK));
    engine
        .snapshot_append_storage_device(&id, storage, &[SectorRange::new(0, 4 * CHUNK / 512)])
        .unwrap();
    assert_eq!(engine.snapshot_add(&id, "a").unwrap_err().errno(), 17);
    let other = engine
        .snapshot_create(StorageSpec::Empty, SnapshotOptions::default())
        .unwrap();
    let err = engine.snapshot_add(&other, "a").unwrap_err();
    assert_eq!(err.errno(), 16);
    assert!(err.to_string().contains(&id.to_string()), "{err}");
    let err = engine.detach("a").unwrap_err();
    assert_eq!(err.errno(), 16, "{err}");
    assert!(matches!(engine.image("a"), Err(Error::WrongState(_))));
    engine.snapshot_take(&id).unwrap();
    assert_eq!(engine.snapshot_take(&id).unwrap_err().errno(), 1);
    assert_eq!(engine.snapshot_add(&id, "b").unwrap_err().errno(), 1);
    let unknown = Uuid::new_v4();
    for err in [
        engine.snapshot_take(&unknown).unwrap_err(),
        engine.snapshot_destroy(&unknown).unwrap_err(),
        engine.snapshot_info(&unknown).unwrap_err(),
        engine.snapshot_add(&unknown, "b").unwrap_err(),
    ] {
        assert_eq!(err.errno(), 2, "{err}");
        assert!(err.to_string().contains(&unknown.to_string()), "{err}");
    }
    assert_eq!(
        engine
            .snapshot_create(
                StorageSpec::Empty,
                SnapshotOptions {
                    limit: Some(0),
                    ..Default::default()
                }
            )
            .unwrap_err()
            .errno(),
        22
    );
    let err = engine
        .snapshot_create(
            StorageSpec::Path("/nonexistent/store".into()),
            SnapshotOptions::default(),
        )
        .unwrap_err();
    assert_eq!(err.errno(), 2);
    assert!(err.to_string().contains("/nonexistent/store"), "{err}");

    let device = engine.device("a").unwrap();
    let err = device.write(&[0; 1024], 4 * CHUNK - 512).unwrap_err();
    assert!(
        matches!(err, Error::OutOfRange { .. }) && err.to_string().contains("a:"),
        "{err}"
    );
    let err = engine
        .image("a")
        .unwrap()
        .read(&mut [0; 2], u64::MAX)
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::OutOfRange {
                offset: u64::MAX,
                len: 2,
                ..
            }
        ) && err.errno() == 22,
        "{err}"
    );
    assert!(device.write(&[], 4 * CHUNK).is_ok());

    // Events: a wait times out empty; a wait on a destroyed snapshot says so.
    let started = Instant::now();
    assert_eq!(
        engine
            .snapshot_wait_event(&id, Duration::from_millis(50))
            .unwrap(),
        None
    );
    assert!(started.elapsed() >= Duration::from_millis(50));
    let waiter = {
        let engine = Arc::new(engine);
        let e2 = engine.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let t = thread::spawn(move || {
            ready_tx.send(()).unwrap();
            let started = Instant::now();
            (
                e2.snapshot_wait_event(&id, Duration::from_secs(30)),
                started.elapsed(),
            )
        });
        // The waiter is about to wait (or waits already): either way the
        // destroy must end its wait with NotFound, long before 30 s.
        ready_rx.recv().unwrap();
        let image = engine.image("a").unwrap();
        engine.snapshot_destroy(&id).unwrap();
        assert!(matches!(
            image.read(&mut [0; 512], 0),
            Err(Error::NotFound(_))
        ));
        engine.detach("a").unwrap();
        assert_eq!(engine.snapshot_collect(), vec![other]);
        t
    };
    let (result, waited) = waiter.join().unwrap();
    assert!(matches!(result, Err(Error::NotFound(_))), "{result:?}");
    assert!(
        waited < Duration::from_secs(20),
        "waiter not woken by the destroy: {waited:?}"
    );
}

#[test]
fn zero_length_requests_change_nothing() {
    let engine = Engine::new(Config::default()).unwrap();
    setup(&engine, "d", 4 * CHUNK);
    let device = engine.device("d").unwrap();
    device.write(&[], 0).unwrap();
    device.discard(CHUNK, 0).unwrap();
    device.write_zeroes(2 * CHUNK, 0).unwrap();
    let id = snapshot_one(&engine, "d", mem_storage(CHUNK));
    assert!(engine.read_cbt_map("d").unwrap().iter().all(|&b| b == 0));
    device.write(&[], 0).unwrap();
    assert_eq!(
        engine.snapshot_info(&id).unwrap().storage.used,
        0,
        "an empty write copied a chunk"
    );
}

#[test]
fn appended_ranges_that_overflow_are_refused() {
    let engine = Engine::new(Config::default()).unwrap();
    setup(&engine, "d", 4 * CHUNK);
    let id = engine
        .snapshot_create(StorageSpec::Empty, SnapshotOptions::default())
        .unwrap();
    let backing: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(1 << 20));
    for range in [SectorRange::new(1 << 55, 8), SectorRange::new(u64::MAX, 1)] {
        let err = engine
            .snapshot_append_storage_device(&id, backing.clone(), &[range])
            .unwrap_err();
        assert_eq!(err.errno(), 22, "{err}");
    }
    assert_eq!(engine.snapshot_info(&id).unwrap().storage.total, 0);
}

#[test]
fn reserved_volume_names_are_refused() {
    let engine = Engine::new(Config::default()).unwrap();
    for name in ["snapshot", ".", ".."] {
        let err = engine
            .attach(name, Arc::new(MemDevice::new(4096)))
            .unwrap_err();
        assert_eq!(err.errno(), 22, "{name}: {err}");
        assert!(err.to_string().contains("reserved"), "{err}");
    }
    engine
        .attach("snapshots", Arc::new(MemDevice::new(4096)))
        .unwrap();
}

/// A device released to pass-through (its loop device still mounted) keeps
/// serving the handles taken before: reads and writes reach the origin, with
/// no change tracking; it is gone from the engine (no snapshot can name it);
/// a detached device's handles fail instead. Refused, as a detach, while
/// the device is in a snapshot.
#[test]
fn pass_through_serves_old_handles_untracked() {
    let engine = Engine::new(Config::default()).unwrap();
    let origin = Arc::new(MemDevice::new(4 * CHUNK));
    engine.attach("p", origin.clone()).unwrap();
    setup(&engine, "d", 4 * CHUNK);
    let p = engine.device("p").unwrap();
    let d = engine.device("d").unwrap();

    let id = engine
        .snapshot_create(mem_storage(8 * CHUNK), SnapshotOptions::default())
        .unwrap();
    engine.snapshot_add(&id, "p").unwrap();
    let err = engine.detach_to_pass_through("p").unwrap_err();
    assert_eq!(err.errno(), 16, "{err}");
    assert!(err.to_string().contains(&id.to_string()), "{err}");
    engine.snapshot_destroy(&id).unwrap();

    p.write(&[0x11; 512], 0).unwrap();
    let released = engine.detach_to_pass_through("p").unwrap();
    assert!(Arc::ptr_eq(&released, &p));
    assert_eq!(p.mode(), blksnap_engine::DeviceMode::PassThrough);
    let map_at_release = p.change_tracker().state();
    assert!(engine.device("p").is_err());
    assert!(engine.volume("p").is_none());
    let other = engine
        .snapshot_create(mem_storage(8 * CHUNK), SnapshotOptions::default())
        .unwrap();
    assert_eq!(engine.snapshot_add(&other, "p").unwrap_err().errno(), 2);

    p.write(&[0x22; 1024], 2 * CHUNK).unwrap();
    p.discard(3 * CHUNK, 512).unwrap();
    p.flush().unwrap();
    let mut back = vec![0; 1024];
    p.read(&mut back, 2 * CHUNK).unwrap();
    assert_eq!(back, vec![0x22; 1024]);
    let mut on_origin = vec![0; 1024];
    origin.read_at(&mut on_origin, 2 * CHUNK).unwrap();
    assert_eq!(
        on_origin,
        vec![0x22; 1024],
        "pass-through write not on the origin"
    );
    assert_eq!(
        p.change_tracker().state(),
        map_at_release,
        "a pass-through write was tracked"
    );

    engine.detach("d").unwrap();
    assert_eq!(d.mode(), blksnap_engine::DeviceMode::Detached);
    assert_eq!(d.write(&[1; 512], 0).unwrap_err().errno(), 2);
    assert_eq!(d.read(&mut [0; 512], 0).unwrap_err().errno(), 2);
}
