//! The schedule checker of the copy-on-write state machine: the engine built
//! with the `shuttle` feature (every lock, atomic, condition wait and thread
//! of the engine is shuttle's, see src/sync.rs) and run over many thread
//! interleavings chosen by shuttle's randomized and PCT schedulers.
//!
//! Each scenario races origin writers, image readers, an image writer, a
//! take, a destroy, storage appends and growth (file storage grown by the
//! background growth thread), copy failures and copy timeouts, and checks the invariants of DESIGN.md:
//! - an image read that returns Ok returns exactly the take's data, plus the
//!   image's own writes;
//! - no origin write reaches the origin before its chunk's old content is in
//!   the storage, or the image is marked failed (a valid image read at the end
//!   equals the take's data, every chunk from its own slot);
//! - no waiter outlives destroy (shuttle fails a run where a thread blocks
//!   for ever);
//! - an acknowledged origin write is on the origin.
//!
//! `cargo test -p blksnap-engine --features shuttle --test schedules`; the
//! number of schedules per scenario is `BLKSNAP_SCHEDULES` (default: a
//! bounded run for CI).
#![cfg(feature = "shuttle")]

use std::sync::Arc;
use std::time::Duration;

use blksnap_engine::{
    BlockDevice, Config, CopyErrorPolicy, Engine, Error, Image, MemDevice, SectorRange,
    SnapshotOptions, StorageSpec,
};
use shuttle::thread;

const CHUNK: u64 = 4096;
const CHUNKS: u64 = 4;
const SECTORS_PER_CHUNK: u64 = CHUNK / 512;

fn schedules() -> usize {
    std::env::var("BLKSNAP_SCHEDULES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000)
}

fn engine() -> Engine {
    Engine::new(Config {
        tracking_block_minimum_shift: 12,
        chunk_minimum_shift: 12,
        chunk_maximum_shift: 12,
        diff_storage_minimum: CHUNK,
        storage_wait: Duration::from_millis(10),
        ..Config::default()
    })
    .unwrap()
}

/// The take-time content of chunk `c`: every byte `c + 1`.
fn take_byte(c: u64) -> u8 {
    c as u8 + 1
}

fn take_content() -> Vec<u8> {
    (0..CHUNKS)
        .flat_map(|c| std::iter::repeat_n(take_byte(c), CHUNK as usize))
        .collect()
}

/// An origin holding [`take_content`].
fn origin() -> Arc<MemDevice> {
    let origin = Arc::new(MemDevice::new(CHUNKS * CHUNK));
    origin.write_at(&take_content(), 0).unwrap();
    origin
}

/// Data an image write puts in chunk 2.
const IMAGE_BYTE: u8 = 0xEE;

/// Checks an image read: Ok means exactly the take's data, but chunk 2 may
/// hold the image's own write (whole, or not at all, per 512-byte sector
/// since the image write is one request over the chunk).
fn check_image_read(result: Result<Vec<u8>, Error>, image_write_started: bool) {
    let Ok(data) = result else { return };
    let expected = take_content();
    for c in 0..CHUNKS {
        let got = &data[(c * CHUNK) as usize..((c + 1) * CHUNK) as usize];
        let take = &expected[(c * CHUNK) as usize..((c + 1) * CHUNK) as usize];
        if c == 2 && image_write_started {
            assert!(
                got.iter().all(|&b| b == take_byte(2) || b == IMAGE_BYTE),
                "image chunk 2 holds neither the take's data nor the image write"
            );
        } else {
            assert!(got == take, "image chunk {c} differs from the take's data");
        }
    }
}

fn read_image(image: &Image) -> Result<Vec<u8>, Error> {
    let mut buf = vec![0u8; (CHUNKS * CHUNK) as usize];
    image.read(&mut buf, 0).map(|()| buf)
}

/// Origin writers (one over chunks 0-1, one inside chunk 1, one over chunk
/// 3), an image reader, an image writer of chunk 2, a storage appender and
/// (when `destroy`) a destroy, with storage for one chunk at the take.
fn writers_readers_append_destroy(policy: CopyErrorPolicy, destroy: bool) {
    let engine = Arc::new(engine());
    let origin = origin();
    let device = engine.attach("d", origin.clone()).unwrap();
    let options = SnapshotOptions {
        on_copy_error: Some(policy),
        ..SnapshotOptions::default()
    };
    let id = engine
        .snapshot_create(
            StorageSpec::Device(Arc::new(MemDevice::new(CHUNK))),
            options,
        )
        .unwrap();
    engine.snapshot_add(&id, "d").unwrap();
    engine.snapshot_take(&id).unwrap();
    let image = engine.image("d").unwrap();

    let spare: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(3 * CHUNK));
    let appender = {
        let (engine, spare) = (engine.clone(), spare.clone());
        thread::spawn(move || {
            for i in 0..3 {
                let range = SectorRange::new(i * SECTORS_PER_CHUNK, SECTORS_PER_CHUNK);
                // Fails once the snapshot is destroyed.
                let _ = engine.snapshot_append_storage_device(&id, spare.clone(), &[range]);
            }
        })
    };
    let w1 = {
        let device = device.clone();
        thread::spawn(move || device.write(&[0xA1; 2 * CHUNK as usize], 0).is_ok())
    };
    let w2 = {
        let device = device.clone();
        thread::spawn(move || device.write(&[0xA2; 512], CHUNK + 1024).is_ok())
    };
    let w3 = {
        let device = device.clone();
        thread::spawn(move || device.write(&[0xA3; 512], 3 * CHUNK).is_ok())
    };
    let reader = {
        let image = image.clone();
        thread::spawn(move || {
            for _ in 0..2 {
                check_image_read(read_image(&image), true);
            }
        })
    };
    let image_writer = {
        let image = image.clone();
        thread::spawn(move || {
            image
                .write(&[IMAGE_BYTE; CHUNK as usize], 2 * CHUNK)
                .is_ok()
        })
    };
    let destroyer = destroy.then(|| {
        let engine = engine.clone();
        thread::spawn(move || engine.snapshot_destroy(&id).unwrap())
    });

    appender.join().unwrap();
    let w1 = w1.join().unwrap();
    let w2 = w2.join().unwrap();
    let w3 = w3.join().unwrap();
    reader.join().unwrap();
    let image_written = image_writer.join().unwrap();
    if let Some(d) = destroyer {
        d.join().unwrap();
    }

    // Acknowledged writes are on the origin; refused ones are not.
    let mut expected = take_content();
    if w1 {
        expected[..2 * CHUNK as usize].fill(0xA1);
    }
    if w2 {
        expected[(CHUNK + 1024) as usize..(CHUNK + 1536) as usize].fill(0xA2);
    }
    if w3 {
        expected[3 * CHUNK as usize..(3 * CHUNK + 512) as usize].fill(0xA3);
    }
    let mut on_origin = vec![0u8; (CHUNKS * CHUNK) as usize];
    origin.read_at(&mut on_origin, 0).unwrap();
    if w1 && w2 {
        // Both touched chunk 1: either order.
        let mut other = expected.clone();
        other[(CHUNK + 1024) as usize..(CHUNK + 1536) as usize].fill(0xA1);
        assert!(
            on_origin == expected || on_origin == other,
            "origin lost a write"
        );
    } else {
        assert!(
            on_origin == expected,
            "origin differs from the acknowledged writes"
        );
    }
    if policy == CopyErrorPolicy::BreakOriginWrite && !destroy {
        // The image is never sacrificed under this policy.
        assert_eq!(image.error_code(), 0);
    }

    // A valid image at the end still reads the take's data, every chunk from
    // its own slot, and the image write when it was acknowledged.
    match read_image(&image) {
        Ok(data) => {
            let mut take = take_content();
            if image_written {
                take[2 * CHUNK as usize..3 * CHUNK as usize].fill(IMAGE_BYTE);
                assert!(data == take, "image after the run differs");
            } else {
                check_image_read(Ok(data), true);
            }
        }
        Err(Error::NotFound(_)) => assert!(destroy),
        Err(Error::Corrupted { .. }) => {
            assert_eq!(policy, CopyErrorPolicy::KeepOriginWrites)
        }
        Err(e) => panic!("unexpected image error: {e}"),
    }
    if !destroy {
        engine.snapshot_destroy(&id).unwrap();
    }
}

/// Copies that time out (on the copier pool) or fail (origin reads failing
/// for a while), racing writers and a reader of the same chunks.
fn copy_timeouts_and_failures(policy: CopyErrorPolicy) {
    let engine = Arc::new(engine());
    let origin = origin();
    let device = engine.attach("d", origin.clone()).unwrap();
    let options = SnapshotOptions {
        on_copy_error: Some(policy),
        copy_timeout: Some(Duration::from_millis(1)),
        ..SnapshotOptions::default()
    };
    let id = engine
        .snapshot_create(
            StorageSpec::Device(Arc::new(MemDevice::new(CHUNKS * CHUNK))),
            options,
        )
        .unwrap();
    engine.snapshot_add(&id, "d").unwrap();
    engine.snapshot_take(&id).unwrap();
    let image = engine.image("d").unwrap();

    let faults = {
        let origin = origin.clone();
        thread::spawn(move || {
            origin.set_fail_reads(true);
            thread::yield_now();
            origin.set_fail_reads(false);
        })
    };
    let writers: Vec<_> = (0..2)
        .map(|i| {
            let device = device.clone();
            thread::spawn(move || device.write(&[0xB0 + i; 512], 512 * i as u64).is_ok())
        })
        .collect();
    let reader = {
        let image = image.clone();
        thread::spawn(move || check_image_read(read_image(&image), false))
    };
    faults.join().unwrap();
    let acked: Vec<bool> = writers.into_iter().map(|w| w.join().unwrap()).collect();
    reader.join().unwrap();
    check_image_read(read_image(&image), false);
    if policy == CopyErrorPolicy::KeepOriginWrites {
        assert!(
            acked.iter().all(|&a| a),
            "keep-origin-writes refused a write"
        );
    }
    engine.snapshot_destroy(&id).unwrap();
    // The copier pool's threads end with the engine.
    drop(image);
    drop(device);
    drop(engine);
}

/// Writes racing a take: a whole-chunk write is in the image entirely or not
/// at all, and a write acknowledged before the take started is in it.
fn take_races_writes() {
    let engine = Arc::new(engine());
    let origin = origin();
    let device = engine.attach("d", origin.clone()).unwrap();
    device.write(&[0xC0; CHUNK as usize], 0).unwrap();
    let id = engine
        .snapshot_create(
            StorageSpec::Device(Arc::new(MemDevice::new(CHUNKS * CHUNK))),
            SnapshotOptions::default(),
        )
        .unwrap();
    engine.snapshot_add(&id, "d").unwrap();
    let writer = {
        let device = device.clone();
        thread::spawn(move || {
            device.write(&[0xC1; CHUNK as usize], 0).unwrap();
            device.write(&[0xC2; CHUNK as usize], CHUNK).unwrap();
        })
    };
    let taker = {
        let engine = engine.clone();
        thread::spawn(move || engine.snapshot_take(&id).unwrap())
    };
    taker.join().unwrap();
    let image = engine.image("d").unwrap();
    let mut buf = vec![0u8; (2 * CHUNK) as usize];
    image.read(&mut buf, 0).unwrap();
    writer.join().unwrap();
    let chunk0 = &buf[..CHUNK as usize];
    let chunk1 = &buf[CHUNK as usize..];
    assert!(
        chunk0.iter().all(|&b| b == 0xC0) || chunk0.iter().all(|&b| b == 0xC1),
        "chunk 0 of the image is torn"
    );
    assert!(
        chunk1.iter().all(|&b| b == take_byte(1)) || chunk1.iter().all(|&b| b == 0xC2),
        "chunk 1 of the image is torn"
    );
    // Program order: the second write is in the image only if the first is.
    if chunk1[0] == 0xC2 {
        assert_eq!(
            chunk0[0], 0xC1,
            "a later write is in the image, an earlier one not"
        );
    }
    // After the writer is done, the image is what it was.
    let mut again = vec![0u8; (2 * CHUNK) as usize];
    image.read(&mut again, 0).unwrap();
    assert!(again == buf, "the image changed after the take");
    engine.snapshot_destroy(&id).unwrap();
}

/// One take of two devices against writers on both, and a destroy: the
/// take is one point in time for both devices (the doors closed before the
/// gates are taken change when writes wait, not what the images hold).
/// Writer 1 writes A then B; writer 2 writes B then A. For each writer, a
/// later write in an image means its earlier one is there too.
fn take_of_two_devices_races_writes() {
    let engine = Arc::new(engine());
    let a = engine.attach("a", origin()).unwrap();
    let b = engine.attach("b", origin()).unwrap();
    let id = engine
        .snapshot_create(
            StorageSpec::Device(Arc::new(MemDevice::new(2 * CHUNKS * CHUNK))),
            SnapshotOptions::default(),
        )
        .unwrap();
    engine.snapshot_add(&id, "a").unwrap();
    engine.snapshot_add(&id, "b").unwrap();
    let writers: Vec<_> = [(a.clone(), b.clone(), 0xA1u8), (b.clone(), a.clone(), 0xB1)]
        .into_iter()
        .map(|(first, second, byte)| {
            thread::spawn(move || {
                first.write(&[byte; CHUNK as usize], 0).unwrap();
                second.write(&[byte + 1; CHUNK as usize], CHUNK).unwrap();
            })
        })
        .collect();
    let taker = {
        let engine = engine.clone();
        thread::spawn(move || engine.snapshot_take(&id).unwrap())
    };
    taker.join().unwrap();
    let chunk = |name: &str, c: u64| {
        let mut buf = vec![0u8; CHUNK as usize];
        engine
            .image(name)
            .unwrap()
            .read(&mut buf, c * CHUNK)
            .unwrap();
        assert!(
            buf.iter().all(|&x| x == buf[0]),
            "chunk {c} of {name} is torn"
        );
        buf[0]
    };
    let (a0, a1, b0, b1) = (chunk("a", 0), chunk("a", 1), chunk("b", 0), chunk("b", 1));
    for w in writers {
        w.join().unwrap();
    }
    // Writer 1: A chunk 0 (0xA1), then B chunk 1 (0xA2).
    assert!(
        b1 != 0xA2 || a0 == 0xA1,
        "B holds writer 1's second write, A not its first"
    );
    // Writer 2: B chunk 0 (0xB1), then A chunk 1 (0xB2).
    assert!(
        a1 != 0xB2 || b0 == 0xB1,
        "A holds writer 2's second write, B not its first"
    );
    for (got, before, written) in [
        (a0, take_byte(0), 0xA1),
        (b1, take_byte(1), 0xA2),
        (b0, take_byte(0), 0xB1),
        (a1, take_byte(1), 0xB2),
    ] {
        assert!(
            got == before || got == written,
            "an image chunk holds {got:#x}"
        );
    }
    // Writes after the take go on, and the destroy lets later ones through.
    engine.snapshot_destroy(&id).unwrap();
    a.write(&[0x5A; CHUNK as usize], 0).unwrap();
    b.write(&[0x5A; CHUNK as usize], 0).unwrap();
}

/// Writers of all four chunks race the background growth of a directory
/// storage (an O_TMPFILE growing by one chunk, so every copy starts a
/// growth and most wait for one), an image reader, and (when `destroy`) a
/// destroy that closes the storage while a growth may be in flight. With
/// `limit`, the storage holds three chunks: one copy overflows.
fn growth_races_writers_and_destroy(limit: bool, destroy: bool) {
    let engine = Arc::new(engine());
    let origin = origin();
    let device = engine.attach("d", origin.clone()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let options = SnapshotOptions {
        limit: limit.then_some(3 * CHUNK),
        ..SnapshotOptions::default()
    };
    let id = engine
        .snapshot_create(StorageSpec::Path(dir.path().to_path_buf()), options)
        .unwrap();
    engine.snapshot_add(&id, "d").unwrap();
    engine.snapshot_take(&id).unwrap();
    let image = engine.image("d").unwrap();

    let writers: Vec<_> = (0..CHUNKS)
        .map(|c| {
            let device = device.clone();
            thread::spawn(move || device.write(&[0xB0 + c as u8; 512], c * CHUNK).is_ok())
        })
        .collect();
    let reader = {
        let image = image.clone();
        thread::spawn(move || check_image_read(read_image(&image), false))
    };
    let destroyer = destroy.then(|| {
        let engine = engine.clone();
        thread::spawn(move || engine.snapshot_destroy(&id).unwrap())
    });
    for w in writers {
        // Keep-origin-writes: every origin write proceeds.
        assert!(w.join().unwrap(), "an origin write failed");
    }
    reader.join().unwrap();
    if let Some(d) = destroyer {
        d.join().unwrap();
    }

    let mut expected = take_content();
    for c in 0..CHUNKS {
        let at = (c * CHUNK) as usize;
        expected[at..at + 512].fill(0xB0 + c as u8);
    }
    let mut on_origin = vec![0u8; (CHUNKS * CHUNK) as usize];
    origin.read_at(&mut on_origin, 0).unwrap();
    assert!(on_origin == expected, "origin differs from the writes");
    match read_image(&image) {
        Ok(data) => {
            assert!(!limit || destroy, "four copies fit in three chunks");
            check_image_read(Ok(data), false);
        }
        Err(Error::NotFound(_)) => assert!(destroy),
        Err(Error::Corrupted { .. }) => assert!(limit),
        Err(e) => panic!("unexpected image error: {e}"),
    }
    if !destroy {
        engine.snapshot_wait_storage_growth(&id).unwrap();
        let st = engine.snapshot_info(&id).unwrap().storage;
        assert!(st.used <= st.total, "{st:?}");
        let most = if limit { 3 * CHUNK } else { 5 * CHUNK };
        assert!(st.total <= most, "grown past what was needed: {st:?}");
        engine.snapshot_destroy(&id).unwrap();
    }
}

fn run(name: &str, f: impl Fn() + Send + Sync + 'static) {
    let n = schedules();
    let f = Arc::new(f);
    let g = f.clone();
    shuttle::check_random(move || g(), n);
    shuttle::check_pct(move || f(), n, 3);
    eprintln!(
        "schedules: {name}: {} explored ({n} random + {n} PCT)",
        2 * n
    );
}

#[test]
fn writers_readers_and_appends_keep_origin_writes() {
    run("writers_readers_and_appends_keep_origin_writes", || {
        writers_readers_append_destroy(CopyErrorPolicy::KeepOriginWrites, false)
    });
}

#[test]
fn writers_readers_and_appends_break_origin_write() {
    run("writers_readers_and_appends_break_origin_write", || {
        writers_readers_append_destroy(CopyErrorPolicy::BreakOriginWrite, false)
    });
}

#[test]
fn destroy_races_writers_and_readers() {
    run("destroy_races_writers_and_readers", || {
        writers_readers_append_destroy(CopyErrorPolicy::KeepOriginWrites, true)
    });
}

#[test]
fn destroy_races_writers_and_readers_break_origin_write() {
    run(
        "destroy_races_writers_and_readers_break_origin_write",
        || writers_readers_append_destroy(CopyErrorPolicy::BreakOriginWrite, true),
    );
}

#[test]
fn copy_timeouts_and_failures_keep_origin_writes() {
    run("copy_timeouts_and_failures_keep_origin_writes", || {
        copy_timeouts_and_failures(CopyErrorPolicy::KeepOriginWrites)
    });
}

#[test]
fn copy_timeouts_and_failures_break_origin_write() {
    run("copy_timeouts_and_failures_break_origin_write", || {
        copy_timeouts_and_failures(CopyErrorPolicy::BreakOriginWrite)
    });
}

#[test]
fn take_races_writes_schedules() {
    run("take_races_writes", take_races_writes);
}

#[test]
fn take_of_two_devices_races_writes_schedules() {
    run(
        "take_of_two_devices_races_writes",
        take_of_two_devices_races_writes,
    );
}

#[test]
fn growth_races_writers() {
    run("growth_races_writers", || {
        growth_races_writers_and_destroy(false, false)
    });
}

#[test]
fn growth_races_writers_at_the_limit() {
    run("growth_races_writers_at_the_limit", || {
        growth_races_writers_and_destroy(true, false)
    });
}

#[test]
fn growth_races_writers_and_destroy_schedules() {
    run("growth_races_writers_and_destroy", || {
        growth_races_writers_and_destroy(false, true)
    });
    run("growth_races_writers_and_destroy_at_the_limit", || {
        growth_races_writers_and_destroy(true, true)
    });
}
