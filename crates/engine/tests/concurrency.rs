//! Concurrency tests on real image files:
//! - stress: writer threads and image-reader threads on several devices,
//!   with takes and destroys in between; every block an image returns must be
//!   the block's content at the take (never a torn block, never a write issued
//!   after the take returned), and nothing deadlocks (a watchdog bounds time);
//!   The storage (a directory's tmpfile or a regular file, alternating) grows
//!   in steps of two chunks, so it grows many times per round while writers
//!   copy chunks concurrently; an image writer writes into the images
//!   meanwhile (its blocks must read back exactly, their chunk neighbours
//!   must keep the take's data, the origin must never see them);
//! - cross-device consistency: a writer writes increasing sequence numbers to
//!   device A then device B, at offset 0 and at one of 64 chunks; in the
//!   images of one snapshot of both, every chunk holds a cut of the writer's
//!   history, seq(A) is seq(B) or seq(B) + 1, and every write acknowledged
//!   before the take (and none issued after it) is in the image;
//! - overflow under concurrent writers, for both failure policies.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use blksnap_engine::{
    Config, CopyErrorPolicy, Engine, Error, Event, FileDevice, Image, SnapshotOptions, StorageSpec,
};
use blksnap_test_support::{sparse_file, Pattern};
use common::snapshot_of;

mod common;

const BLOCK: u64 = 4096;
const CHUNK: u64 = 64 << 10;
const STEP: u64 = 2 * CHUNK;
/// Blocks the image writer of the stress test writes (origin writers write
/// them too): one per 16, i.e. one per chunk.
const IMAGE_BLOCK_EVERY: u64 = 16;
/// Image writes carry this bit in their stamp (and a pattern of another
/// device tag), so they can never be mistaken for origin writes.
const IMAGE_SEQ: u64 = 1 << 63;

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
        chunk_maximum_shift: 16,
        // Two chunks: the storage grows again every one or two copies.
        diff_storage_minimum: STEP,
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
    let tag = if seq & IMAGE_SEQ != 0 { dev + 8 } else { dev };
    let mut data = Pattern::Random.bytes(tag << 48 ^ block << 24 ^ seq, BLOCK);
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
    /// (device, block, seq) of the full read after the image writer stopped.
    last: Vec<(u64, u64, u64)>,
    /// The image writes of the round, in order.
    image_writes: Vec<(u64, u64, u64)>,
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
    let mut extents_per_round = Vec::new();
    while Instant::now() < deadline || rounds.len() < 4 {
        // Alternately a directory (O_TMPFILE) and an empty regular file.
        let spec = if rounds.len() % 2 == 0 {
            StorageSpec::Path(dir.path().to_path_buf())
        } else {
            let name = format!("store{}", rounds.len());
            StorageSpec::Path(sparse_file(dir.path(), &name, 0))
        };
        let id = engine
            .snapshot_create(spec, SnapshotOptions::default())
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
                            // Image blocks may be mid-write: checked by the
                            // full read once the image writer stopped.
                            if block % IMAGE_BLOCK_EVERY != IMAGE_BLOCK_EVERY - 1 {
                                seen.push((d, block, decode(d, block, data)));
                            }
                        }
                    }
                })
            })
            .collect();
        // The image writer: one block per chunk, racing the origin writers'
        // copies of the same chunks.
        let image_stop = Arc::new(AtomicBool::new(false));
        let image_writer = {
            let (images, image_stop) = (images.clone(), image_stop.clone());
            let round = rounds.len() as u64;
            thread::spawn(move || {
                let mut rng = fastrand::Rng::with_seed(1000 + round);
                let mut log = Vec::new();
                let mut n = 0u64;
                while !image_stop.load(Ordering::Relaxed) {
                    let d = rng.u64(0..DEVICES);
                    let block = rng.u64(0..BLOCKS / IMAGE_BLOCK_EVERY) * IMAGE_BLOCK_EVERY
                        + IMAGE_BLOCK_EVERY
                        - 1;
                    n += 1;
                    let seq = IMAGE_SEQ | round << 32 | n;
                    images[d as usize]
                        .write(&block_content(d, block, seq), block * BLOCK)
                        .unwrap_or_else(|e| panic!("image write: {e}"));
                    log.push((d, block, seq));
                }
                log
            })
        };
        // Readiness, not time: wait until the origin writers made enough
        // writes after the take that the storage must grow many times.
        let wait_from = Instant::now();
        while clock.load(Ordering::SeqCst) < t1 + 2 * 400 {
            assert!(
                wait_from.elapsed() < Duration::from_secs(60),
                "writers made no progress"
            );
            thread::sleep(Duration::from_millis(1));
        }
        image_stop.store(true, Ordering::Relaxed);
        let image_writes = image_writer.join().unwrap();
        // A full read of every image at the end of the round.
        let mut last = Vec::new();
        let mut buf = vec![0u8; SIZE as usize];
        for (d, image) in images.iter().enumerate() {
            image.read(&mut buf, 0).unwrap();
            for (block, data) in buf.chunks(BLOCK as usize).enumerate() {
                last.push((d as u64, block as u64, decode(d as u64, block as u64, data)));
            }
        }
        extents_per_round.push(engine.snapshot_info(&id).unwrap().storage.extents);
        engine.snapshot_destroy(&id).unwrap();
        let mut seen = Vec::new();
        for reader in readers {
            seen.extend(reader.join().unwrap());
        }
        rounds.push(Round {
            t0,
            t1,
            seen,
            last,
            image_writes,
        });
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

    // 400 writes after the take over 384 chunks copy at least ~100 chunks,
    // in 2-chunk growth steps.
    assert!(
        extents_per_round.iter().all(|&e| e >= 10),
        "the storage did not grow under contention: extents per round {extents_per_round:?}"
    );
    let mut checked = 0;
    for round in &rounds {
        for &(d, block, seq) in &round.last {
            let mine = round
                .image_writes
                .iter()
                .rev()
                .find(|&&(id, ib, _)| id == d && ib == block);
            if let Some(&(_, _, written)) = mine {
                assert_eq!(
                    seq, written,
                    "dev{d} block {block}: the image lost its own write {written:#x}"
                );
            } else {
                let ok = allowed(&logs[d as usize][block as usize], round.t0, round.t1);
                assert!(
                    ok.contains(&seq),
                    "dev{d} block {block}: image holds write {seq:#x}, allowed {ok:?} (take at {}..{})",
                    round.t0,
                    round.t1
                );
            }
            checked += 1;
        }
        // The image is frozen but for its own writes: every read of a
        // block the image writer did not touch returns what the final full
        // read returned (a write that slipped past the take would change it).
        let frozen: std::collections::HashMap<(u64, u64), u64> = round
            .last
            .iter()
            .map(|&(d, block, seq)| ((d, block), seq))
            .collect();
        for &(d, block, seq) in &round.seen {
            assert_eq!(
                seq,
                frozen[&(d, block)],
                "dev{d} block {block}: the image changed during the round"
            );
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
    let image_writes: usize = rounds.iter().map(|r| r.image_writes.len()).sum();
    eprintln!(
        "{} rounds, {writes} writes, {image_writes} image writes, {checked} image blocks checked, \
         storage extents per round {extents_per_round:?}",
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

/// What chunk `k` (1..64) of an image whose offset 0 holds `s` may hold:
/// the writer wrote seq n at offset 0, then at chunk n % 64, so the image
/// is a cut between two of those writes.
fn chunk_allowed(s: u64, k: u64) -> Vec<u64> {
    // The last seq <= s that wrote chunk k (0: none).
    let last = if s % CROSS_CHUNKS >= k {
        s - (s % CROSS_CHUNKS - k)
    } else {
        (s + k).saturating_sub(s % CROSS_CHUNKS + CROSS_CHUNKS)
    };
    if last == s && s > 0 {
        // The cut may fall between offset 0 and chunk k of write s.
        vec![s, s.saturating_sub(CROSS_CHUNKS)]
    } else {
        vec![last]
    }
}

const CROSS_CHUNKS: u64 = 64;

fn cross_device() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(engine());
    for name in ["a", "b"] {
        let path = sparse_file(dir.path(), name, CROSS_CHUNKS * CHUNK);
        engine
            .attach(name, Arc::new(FileDevice::open(&path).unwrap()))
            .unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    // The writer's progress: seq issued (before the first write of it),
    // and the last seq whose writes to a (resp. b) were acknowledged.
    let issued = Arc::new(AtomicU64::new(0));
    let done_a = Arc::new(AtomicU64::new(0));
    let done_b = Arc::new(AtomicU64::new(0));
    let writer = {
        let (a, b) = (engine.device("a").unwrap(), engine.device("b").unwrap());
        let (stop, issued, done_a, done_b) =
            (stop.clone(), issued.clone(), done_a.clone(), done_b.clone());
        thread::spawn(move || {
            let mut seq = 0u64;
            while !stop.load(Ordering::Relaxed) {
                seq += 1;
                issued.store(seq, Ordering::SeqCst);
                // Spread over chunks so some writes copy and some do not.
                let at = (seq % CROSS_CHUNKS) * CHUNK;
                let mut stamp = [0u8; 512];
                stamp[..8].copy_from_slice(&seq.to_le_bytes());
                a.write(&stamp, 0).unwrap();
                a.write(&stamp, at).unwrap();
                done_a.store(seq, Ordering::SeqCst);
                b.write(&stamp, 0).unwrap();
                b.write(&stamp, at).unwrap();
                done_b.store(seq, Ordering::SeqCst);
            }
            seq
        })
    };
    // The stamp of every chunk of an image.
    let read_seqs = |image: &Image| -> Vec<u64> {
        let mut buf = [0u8; 8];
        (0..CROSS_CHUNKS)
            .map(|k| {
                image.read(&mut buf, k * CHUNK).unwrap();
                u64::from_le_bytes(buf)
            })
            .collect()
    };
    let mut distinct = std::collections::HashSet::new();
    let mut rng = fastrand::Rng::with_seed(3);
    for _ in 0..200 {
        thread::sleep(Duration::from_micros(rng.u64(100..3000)));
        let id = engine
            .snapshot_create(
                StorageSpec::Path(dir.path().to_path_buf()),
                SnapshotOptions::default(),
            )
            .unwrap();
        engine.snapshot_add(&id, "a").unwrap();
        engine.snapshot_add(&id, "b").unwrap();
        let (lo_a, lo_b) = (done_a.load(Ordering::SeqCst), done_b.load(Ordering::SeqCst));
        engine.snapshot_take(&id).unwrap();
        let hi = issued.load(Ordering::SeqCst);
        let a = read_seqs(&engine.image("a").unwrap());
        let b = read_seqs(&engine.image("b").unwrap());
        // Let the writer go on (readiness by polling, generous bound), then
        // the images must read the same: nothing reaches them after the take.
        let wait_from = Instant::now();
        while issued.load(Ordering::SeqCst) < hi + 2 {
            assert!(
                wait_from.elapsed() < Duration::from_secs(30),
                "writer stalled"
            );
            thread::yield_now();
        }
        assert_eq!(
            (
                read_seqs(&engine.image("a").unwrap()),
                read_seqs(&engine.image("b").unwrap())
            ),
            (a.clone(), b.clone()),
            "the images changed after the take"
        );
        let (sa, sb) = (a[0], b[0]);
        assert!(
            sa == sb || sa == sb + 1,
            "image of a holds seq {sa}, image of b holds seq {sb}"
        );
        // Holds on any schedule: acknowledged before the take => in the
        // image; issued after it => not.
        assert!(
            (lo_a..=hi).contains(&sa) && (lo_b..=hi).contains(&sb),
            "take between acks a {lo_a} / b {lo_b} and issue {hi}: images hold a {sa}, b {sb}"
        );
        for (name, seqs) in [("a", &a), ("b", &b)] {
            for k in 1..CROSS_CHUNKS {
                let ok = chunk_allowed(seqs[0], k);
                assert!(
                    ok.contains(&seqs[k as usize]),
                    "image of {name}: chunk {k} holds seq {}, offset 0 holds {}; allowed {ok:?}",
                    seqs[k as usize],
                    seqs[0]
                );
            }
        }
        distinct.insert(sa);
        engine.snapshot_destroy(&id).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let total = writer.join().unwrap();
    eprintln!("{total} writes, {} distinct image values", distinct.len());
}

#[test]
fn overflow_under_concurrent_writers_keeps_origin_writes() {
    with_watchdog(Duration::from_secs(120), || {
        overflow_under_load(CopyErrorPolicy::KeepOriginWrites)
    });
}

#[test]
fn overflow_under_concurrent_writers_breaks_origin_writes() {
    with_watchdog(Duration::from_secs(120), || {
        overflow_under_load(CopyErrorPolicy::BreakOriginWrite)
    });
}

/// Two devices share a file storage that grows in 2-chunk steps up to a
/// limit of 16 chunks while four writers copy chunks (each writer touches
/// far more than 16 chunks: the overflow is certain on any schedule).
/// Keep: every origin write succeeds; each image is then either corrupted
/// with ENOSPC (and reads say so) or exactly the take's data. Break: every
/// refused write fails with ENOSPC and leaves its block as it was; both
/// images stay valid and exactly the take's data.
fn overflow_under_load(policy: CopyErrorPolicy) {
    const SIZE: u64 = 4 << 20;
    const BLOCKS: u64 = SIZE / BLOCK;
    const LIMIT: u64 = 16 * CHUNK;
    const WRITES: u64 = 300;
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(engine());
    let mut at_take = Vec::new();
    for d in 0..2u64 {
        let name = format!("disk{d}");
        let data = Pattern::RandomNonZero.bytes(50 + d, SIZE);
        let path = dir.path().join(&name);
        std::fs::write(&path, &data).unwrap();
        engine
            .attach(&name, Arc::new(FileDevice::open(&path).unwrap()))
            .unwrap();
        at_take.push(data);
    }
    let options = SnapshotOptions {
        limit: Some(LIMIT),
        on_copy_error: Some(policy),
        storage_wait: Some(Duration::ZERO),
        ..SnapshotOptions::default()
    };
    let store = sparse_file(dir.path(), "store", 0);
    let id = snapshot_of(
        &engine,
        &["disk0", "disk1"],
        StorageSpec::Path(store),
        options,
    );
    let barrier = Arc::new(std::sync::Barrier::new(4));
    let writers: Vec<_> = (0..4u64)
        .map(|w| {
            let (d, own) = (w / 2, w % 2);
            let device = engine.device(&format!("disk{d}")).unwrap();
            let mut content = at_take[d as usize].clone();
            let barrier = barrier.clone();
            thread::spawn(move || {
                let mut rng = fastrand::Rng::with_seed(w);
                let mut refused = 0u64;
                let mut block_buf = vec![0u8; BLOCK as usize];
                barrier.wait();
                for n in 1..=WRITES {
                    // Writer `own` of the device owns blocks b % 2 == own.
                    let block = rng.u64(0..BLOCKS / 2) * 2 + own;
                    let at = (block * BLOCK) as usize;
                    let data = block_content(d, block, n);
                    match device.write(&data, at as u64) {
                        Ok(()) => content[at..at + BLOCK as usize].copy_from_slice(&data),
                        Err(e) => {
                            assert_eq!(policy, CopyErrorPolicy::BreakOriginWrite, "{e}");
                            assert_eq!(e.errno(), 28, "refused with ENOSPC: {e}");
                            device.read(&mut block_buf, at as u64).unwrap();
                            assert!(
                                block_buf == content[at..at + BLOCK as usize],
                                "disk{d} block {block}: a refused write changed the origin"
                            );
                            refused += 1;
                        }
                    }
                }
                (d, own, content, refused)
            })
        })
        .collect();
    let mut origin_expected = at_take.clone();
    let mut refused = 0;
    for writer in writers {
        let (d, own, content, r) = writer.join().unwrap();
        refused += r;
        for b in (own..BLOCKS).step_by(2) {
            let at = (b * BLOCK) as usize;
            origin_expected[d as usize][at..at + BLOCK as usize]
                .copy_from_slice(&content[at..at + BLOCK as usize]);
        }
    }
    let info = engine.snapshot_info(&id).unwrap();
    assert_eq!(info.storage.total, LIMIT, "grown up to the limit: {info:?}");
    assert_eq!(
        info.storage.extents as u64,
        LIMIT / STEP,
        "grown in steps: {info:?}"
    );
    let events = common::drain_events(&engine, &id);
    assert!(
        events.iter().any(|e| matches!(e, Event::NoSpace { .. })),
        "{events:?}"
    );
    let mut corrupted = 0;
    for d in 0..2usize {
        let name = format!("disk{d}");
        let image = engine.image(&name).unwrap();
        let mut buf = vec![0u8; SIZE as usize];
        let read = image.read(&mut buf, 0);
        match (policy, image.error_code()) {
            (CopyErrorPolicy::KeepOriginWrites, 28) => {
                assert!(
                    matches!(read, Err(Error::Corrupted { errno: 28, .. })),
                    "{name}: {read:?}"
                );
                assert!(
                    events.contains(&Event::Corrupted {
                        device: name.clone(),
                        errno: 28
                    }),
                    "{events:?}"
                );
                corrupted += 1;
            }
            (_, 0) => {
                read.unwrap();
                assert!(
                    buf == at_take[d],
                    "{name}: the valid image is not the take's data"
                );
            }
            (_, errno) => panic!("{name}: image invalid with errno {errno} under {policy:?}"),
        }
        let device = engine.device(&name).unwrap();
        device.read(&mut buf, 0).unwrap();
        assert!(
            buf == origin_expected[d],
            "{name}: the origin does not hold exactly the accepted writes"
        );
    }
    match policy {
        CopyErrorPolicy::KeepOriginWrites => assert!(corrupted > 0, "no image overflowed"),
        CopyErrorPolicy::BreakOriginWrite => assert!(refused > 0, "no write was refused"),
    }
    eprintln!("{policy:?}: {corrupted} corrupted images, {refused} refused writes");
    engine.snapshot_destroy(&id).unwrap();
}
