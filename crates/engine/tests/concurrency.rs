//! Concurrency tests on real image files:
//! - stress: writer threads and image-reader threads on several devices,
//!   with takes and destroys in between; every block an image returns must be
//!   the block's content at the take (never a torn block, never a write issued
//!   after the take returned), and nothing deadlocks (a watchdog bounds time);
//! - cross-device consistency: a writer writes increasing sequence numbers to
//!   device A then device B; in the images of one snapshot of both,
//!   seq(A) is seq(B) or seq(B) + 1.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use blksnap_engine::{Config, Engine, Error, FileDevice, Image, SnapshotOptions, StorageSpec};
use blksnap_test_support::{sparse_file, Pattern};
use common::snapshot_of;

mod common;

const BLOCK: u64 = 4096;

/// Aborts the test process if `f` does not finish in `limit`: a deadlock must
/// fail the test, not hang CI.
fn with_watchdog<T>(limit: Duration, f: impl FnOnce() -> T) -> T {
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let watchdog = thread::spawn(move || {
        if done_rx.recv_timeout(limit) == Err(mpsc::RecvTimeoutError::Timeout) {
            eprintln!("watchdog: test still running after {limit:?}: deadlock");
            std::process::abort();
        }
    });
    let result = f();
    drop(done_tx);
    watchdog.join().unwrap();
    result
}

fn engine() -> Engine {
    Engine::new(Config {
        chunk_minimum_shift: 16,
        diff_storage_minimum: 64 << 20,
        ..Config::default()
    })
    .unwrap()
}

/// The content of block `block` of device `dev` after write `seq` (seq 0:
/// never written, zeroes): an 16-byte stamp, then a pattern of all three.
fn block_content(dev: u64, block: u64, seq: u64) -> Vec<u8> {
    if seq == 0 {
        return vec![0; BLOCK as usize];
    }
    let mut data = Pattern::Random.bytes(dev << 48 ^ block << 24 ^ seq, BLOCK);
    data[..8].copy_from_slice(&seq.to_le_bytes());
    data[8..16].copy_from_slice(&block.to_le_bytes());
    data
}

/// Decodes the write a block holds; panics on a torn or foreign block.
fn decode(dev: u64, block: u64, data: &[u8]) -> u64 {
    if data.iter().all(|&b| b == 0) {
        return 0;
    }
    let seq = u64::from_le_bytes(data[..8].try_into().unwrap());
    assert!(
        data == block_content(dev, block, seq),
        "dev{dev} block {block}: torn or foreign content (stamp seq {seq})"
    );
    seq
}

/// One acknowledged (or discarded-to-zero) write: `seq` 0 is a discard.
#[derive(Clone, Copy)]
struct Logged {
    block: u64,
    seq: u64,
    start: u64,
    end: u64,
}

struct Round {
    /// Ticks before the take started and after it returned.
    t0: u64,
    t1: u64,
    /// (device, block, seq) seen through the image during the round.
    seen: Vec<(u64, u64, u64)>,
}

/// Which values may block `block` hold in an image taken between ticks t0
/// and t1: the last write done before t0, or one that overlapped the take.
fn allowed(writes: &[Logged], t0: u64, t1: u64) -> Vec<u64> {
    let before = writes.iter().filter(|l| l.end < t0).max_by_key(|l| l.end);
    let mut allowed = vec![before.map_or(0, |l| l.seq)];
    allowed.extend(
        writes
            .iter()
            .filter(|l| l.start <= t1 && l.end >= t0)
            .map(|l| l.seq),
    );
    allowed
}

#[test]
fn stress_writers_readers_takes_destroys() {
    with_watchdog(Duration::from_secs(180), stress);
}

fn stress() {
    const DEVICES: u64 = 3;
    const WRITERS_PER_DEVICE: u64 = 2;
    const SIZE: u64 = 8 << 20;
    const BLOCKS: u64 = SIZE / BLOCK;
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(engine());
    let names: Vec<String> = (0..DEVICES).map(|d| format!("disk{d}")).collect();
    for name in &names {
        let path = sparse_file(dir.path(), name, SIZE);
        engine
            .attach(name, Arc::new(FileDevice::open(&path).unwrap()))
            .unwrap();
    }
    let clock = Arc::new(AtomicU64::new(1));
    let stop = Arc::new(AtomicBool::new(false));

    // Writers: writer w of device d owns the blocks b with b % W == w, so
    // each block has one sequential writer and its history is a simple log.
    let mut writers = Vec::new();
    for d in 0..DEVICES {
        for w in 0..WRITERS_PER_DEVICE {
            let device = engine.device(&names[d as usize]).unwrap();
            let (clock, stop) = (clock.clone(), stop.clone());
            writers.push(thread::spawn(move || {
                let mut rng = fastrand::Rng::with_seed(d * 100 + w);
                let mut log = Vec::new();
                let mut seq = w + 1;
                while !stop.load(Ordering::Relaxed) {
                    let block = rng.u64(0..BLOCKS / WRITERS_PER_DEVICE) * WRITERS_PER_DEVICE + w;
                    let discard = rng.u8(..) < 16;
                    let start = clock.fetch_add(1, Ordering::SeqCst);
                    if discard {
                        device.discard(block * BLOCK, BLOCK).unwrap();
                    } else {
                        let data = block_content(d, block, seq);
                        device.write(&data, block * BLOCK).unwrap();
                    }
                    let end = clock.fetch_add(1, Ordering::SeqCst);
                    log.push(Logged {
                        block,
                        seq: if discard { 0 } else { seq },
                        start,
                        end,
                    });
                    seq += WRITERS_PER_DEVICE;
                }
                (d, log)
            }));
        }
    }

    let mut rounds = Vec::new();
    let mut rng = fastrand::Rng::with_seed(7);
    let deadline = Instant::now() + Duration::from_secs(4);
    while Instant::now() < deadline || rounds.len() < 4 {
        let id = engine
            .snapshot_create(
                StorageSpec::Path(dir.path().to_path_buf()),
                SnapshotOptions::default(),
            )
            .unwrap();
        for name in &names {
            engine.snapshot_add(&id, name).unwrap();
        }
        thread::sleep(Duration::from_millis(rng.u64(5..60)));
        let t0 = clock.fetch_add(1, Ordering::SeqCst);
        engine.snapshot_take(&id).unwrap();
        let t1 = clock.fetch_add(1, Ordering::SeqCst);

        // Readers run while writes go on; the last ones are still reading
        // when the snapshot is destroyed.
        let images: Vec<Image> = names.iter().map(|n| engine.image(n).unwrap()).collect();
        let readers: Vec<_> = (0..2u64)
            .map(|r| {
                let images = images.clone();
                thread::spawn(move || {
                    let mut rng = fastrand::Rng::with_seed(r + t0);
                    let mut seen = Vec::new();
                    let mut buf = vec![0u8; 64 * BLOCK as usize];
                    loop {
                        let d = rng.u64(0..DEVICES);
                        let first = rng.u64(0..BLOCKS - 64);
                        let n = rng.u64(1..=64);
                        let buf = &mut buf[..(n * BLOCK) as usize];
                        match images[d as usize].read(buf, first * BLOCK) {
                            Ok(()) => {}
                            Err(Error::NotFound(_)) => return seen,
                            Err(e) => panic!("image read failed: {e}"),
                        }
                        for (i, data) in buf.chunks(BLOCK as usize).enumerate() {
                            let block = first + i as u64;
                            seen.push((d, block, decode(d, block, data)));
                        }
                    }
                })
            })
            .collect();
        thread::sleep(Duration::from_millis(rng.u64(50..300)));
        // A full read of every image at the end of the round.
        let mut seen = Vec::new();
        let mut buf = vec![0u8; SIZE as usize];
        for (d, image) in images.iter().enumerate() {
            image.read(&mut buf, 0).unwrap();
            for (block, data) in buf.chunks(BLOCK as usize).enumerate() {
                seen.push((d as u64, block as u64, decode(d as u64, block as u64, data)));
            }
        }
        engine.snapshot_destroy(&id).unwrap();
        for reader in readers {
            seen.extend(reader.join().unwrap());
        }
        rounds.push(Round { t0, t1, seen });
    }
    stop.store(true, Ordering::Relaxed);
    // logs[device][block]: the block's writes, in the order they were made.
    let mut logs: Vec<Vec<Vec<Logged>>> = vec![vec![Vec::new(); BLOCKS as usize]; DEVICES as usize];
    let mut writes = 0;
    for writer in writers {
        let (d, log) = writer.join().unwrap();
        writes += log.len();
        for l in log {
            logs[d as usize][l.block as usize].push(l);
        }
    }
    assert!(
        writes > 1000,
        "writers made too little progress: {writes} writes"
    );

    let mut checked = 0;
    for round in &rounds {
        for &(d, block, seq) in &round.seen {
            let ok = allowed(&logs[d as usize][block as usize], round.t0, round.t1);
            assert!(
                ok.contains(&seq),
                "dev{d} block {block}: image holds write {seq}, allowed {ok:?} (take at {}..{})",
                round.t0,
                round.t1
            );
            checked += 1;
        }
    }
    eprintln!(
        "{} rounds, {writes} writes, {checked} image blocks checked",
        rounds.len()
    );

    // After all snapshots: the origins hold the last write of every block.
    for (d, name) in names.iter().enumerate() {
        let device = engine.device(name).unwrap();
        let mut buf = vec![0u8; SIZE as usize];
        device.read(&mut buf, 0).unwrap();
        for (block, data) in buf.chunks(BLOCK as usize).enumerate() {
            let last = logs[d][block].last();
            assert_eq!(
                decode(d as u64, block as u64, data),
                last.map_or(0, |l| l.seq)
            );
        }
    }
}

#[test]
fn takes_are_consistent_across_devices() {
    with_watchdog(Duration::from_secs(120), cross_device);
}

fn cross_device() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(engine());
    for name in ["a", "b"] {
        let path = sparse_file(dir.path(), name, 4 << 20);
        engine
            .attach(name, Arc::new(FileDevice::open(&path).unwrap()))
            .unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (a, b) = (engine.device("a").unwrap(), engine.device("b").unwrap());
        let stop = stop.clone();
        thread::spawn(move || {
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                // Spread over chunks so some writes copy and some do not.
                let at = (seq % 64) * (64 << 10);
                let mut stamp = [0u8; 512];
                stamp[..8].copy_from_slice(&seq.to_le_bytes());
                a.write(&stamp, 0).unwrap();
                a.write(&stamp, at).unwrap();
                b.write(&stamp, 0).unwrap();
                b.write(&stamp, at).unwrap();
            }
            seq
        })
    };
    let read_seq = |image: &Image| {
        let mut buf = [0u8; 8];
        image.read(&mut buf, 0).unwrap();
        u64::from_le_bytes(buf)
    };
    let mut distinct = std::collections::HashSet::new();
    let mut rng = fastrand::Rng::with_seed(3);
    for _ in 0..200 {
        thread::sleep(Duration::from_micros(rng.u64(100..3000)));
        let id = snapshot_of(
            &engine,
            &["a", "b"],
            StorageSpec::Path(dir.path().to_path_buf()),
            SnapshotOptions::default(),
        );
        let (a, b) = (
            read_seq(&engine.image("a").unwrap()),
            read_seq(&engine.image("b").unwrap()),
        );
        assert!(
            a == b || a == b + 1,
            "image of a holds seq {a}, image of b holds seq {b}"
        );
        distinct.insert(a);
        engine.snapshot_destroy(&id).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let total = writer.join().unwrap();
    eprintln!("{total} writes, {} distinct image values", distinct.len());
    assert!(total > 200, "writer made too little progress: {total}");
    assert!(
        distinct.len() > 50,
        "takes did not interleave with writes: {} distinct values",
        distinct.len()
    );
}
