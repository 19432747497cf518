//! Micro-benchmarks of the engine's data paths, each group comparing the
//! engine against the bare device in one run:
//!
//! - `write_path`: 4 KiB writes straight to a device versus through a tracked
//!   device (change tracking only, no snapshot), on a file and in memory
//!   (over the whole device, and over 1 MiB that stays in the CPU caches).
//! - `first_write_copies`: 4 KiB origin writes that copy their 256 KiB chunk to
//!   the difference storage first, versus rewrites of chunks already copied.
//! - `image_read`: 1 MiB and 4 KiB reads of a snapshot image over uncopied
//!   chunks (read from the origin) and copied chunks (read from the difference
//!   storage), versus reads of the origin itself.
//!
//! Every device covers [`REGION`] bytes; offsets follow fixed permutations so
//! runs are comparable. Files live in `std::env::temp_dir()`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blksnap_engine::{
    BlockDevice, Config, Engine, FileDevice, Image, MemDevice, SnapshotOptions, StorageSpec,
    TrackedDevice,
};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tempfile::{NamedTempFile, TempDir};
use uuid::Uuid;

/// Size of every origin device.
const REGION: u64 = 256 << 20;
const BLOCK: usize = 4096;
const MIB: usize = 1 << 20;
/// Odd multiplier: `i * STRIDE mod 2^k` visits every index of a power-of-two
/// range once per round, in a scattered order.
const STRIDE: u64 = 0x9E37_79B9;

/// The `i`-th index of a deterministic permutation of `0..count` (a power of
/// two).
fn scatter(i: u64, count: u64) -> u64 {
    debug_assert!(count.is_power_of_two());
    i.wrapping_mul(STRIDE) & (count - 1)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|j| (j as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Writes the whole device with a pattern, so a file has no holes and a
/// memory device has every page faulted in.
fn fill(device: &dyn BlockDevice, seed: u8) {
    let buf = pattern(MIB, seed);
    let mut offset = 0;
    while offset < device.size() {
        let n = (device.size() - offset).min(MIB as u64) as usize;
        device.write_at(&buf[..n], offset).expect("prefill");
        offset += n as u64;
    }
}

/// A temporary file of [`REGION`] bytes, fully written, opened as a device.
/// The `NamedTempFile` deletes the file when dropped.
fn temp_file_device(seed: u8) -> (NamedTempFile, FileDevice) {
    let file = NamedTempFile::new_in(std::env::temp_dir()).expect("temp file");
    file.as_file().set_len(REGION).expect("size temp file");
    let device = FileDevice::open(file.path()).expect("open temp file");
    fill(&device, seed);
    (file, device)
}

fn mem_device(size: u64, seed: u8) -> MemDevice {
    let device = MemDevice::new(size);
    fill(&device, seed);
    device
}

fn config(c: Criterion) -> Criterion {
    c.sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

// ---------------------------------------------------------------------------
// write_path

fn write_path(c: &mut Criterion) {
    let mut group = c.benchmark_group("write_path");
    group.throughput(Throughput::Bytes(BLOCK as u64));
    let buf = pattern(BLOCK, 7);
    let blocks = REGION / BLOCK as u64;

    {
        // Two files prepared the same way: FileDevice::open locks its file,
        // so one file cannot be both the bare device and the tracked one.
        let (_direct_file, direct) = temp_file_device(1);
        let (_tracked_file, tracked_origin) = temp_file_device(1);
        let engine = Engine::new(Config::default()).expect("engine");
        let tracked = engine
            .attach("bench", Arc::new(tracked_origin))
            .expect("attach");

        let mut i = 0u64;
        group.bench_function("file/direct", |b| {
            b.iter(|| {
                let offset = scatter(i, blocks) * BLOCK as u64;
                i += 1;
                direct.write_at(black_box(&buf), offset).unwrap();
            })
        });
        let mut i = 0u64;
        group.bench_function("file/tracked", |b| {
            b.iter(|| {
                let offset = scatter(i, blocks) * BLOCK as u64;
                i += 1;
                tracked.write(black_box(&buf), offset).unwrap();
            })
        });
    }

    {
        let direct = mem_device(REGION, 1);
        let engine = Engine::new(Config::default()).expect("engine");
        let tracked = engine
            .attach("bench", Arc::new(mem_device(REGION, 1)))
            .expect("attach");

        let mut i = 0u64;
        group.bench_function("mem/direct", |b| {
            b.iter(|| {
                let offset = scatter(i, blocks) * BLOCK as u64;
                i += 1;
                direct.write_at(black_box(&buf), offset).unwrap();
            })
        });
        let mut i = 0u64;
        group.bench_function("mem/tracked", |b| {
            b.iter(|| {
                let offset = scatter(i, blocks) * BLOCK as u64;
                i += 1;
                tracked.write(black_box(&buf), offset).unwrap();
            })
        });

        // The same devices, writes confined to their first 1 MiB: the data
        // stays in the CPU caches, so what differs is the engine's own work
        // (range check, write gate, change-tracker mark).
        let hot_blocks = (MIB / BLOCK) as u64;
        let mut i = 0u64;
        group.bench_function("mem_hot/direct", |b| {
            b.iter(|| {
                let offset = scatter(i, hot_blocks) * BLOCK as u64;
                i += 1;
                direct.write_at(black_box(&buf), offset).unwrap();
            })
        });
        let mut i = 0u64;
        group.bench_function("mem_hot/tracked", |b| {
            b.iter(|| {
                let offset = scatter(i, hot_blocks) * BLOCK as u64;
                i += 1;
                tracked.write(black_box(&buf), offset).unwrap();
            })
        });
    }
    group.finish();
}

// ---------------------------------------------------------------------------
// Snapshot rigs shared by first_write_copies and image_read

/// One tracked origin of [`REGION`] bytes in one snapshot that can be
/// destroyed and taken again.
struct SnapshotRig {
    engine: Engine,
    tracked: Arc<TrackedDevice>,
    /// The origin behind `tracked`, for baseline reads.
    origin: Arc<dyn BlockDevice>,
    storage: StorageSpec,
    snapshot: Option<Uuid>,
    chunk_size: u64,
    chunks: u64,
    /// Keep the temporary origin file and storage directory alive.
    _files: (Option<NamedTempFile>, Option<TempDir>),
}

impl SnapshotRig {
    /// In memory: a memory origin and a memory storage that holds every
    /// chunk (reused across snapshots, so its pages stay faulted in).
    fn memory(seed: u8) -> Self {
        let engine = Engine::new(Config::default()).expect("engine");
        let origin: Arc<dyn BlockDevice> = Arc::new(mem_device(REGION, seed));
        let tracked = engine.attach("origin", origin.clone()).expect("attach");
        let storage = StorageSpec::Device(Arc::new(mem_device(REGION, 0)));
        Self::new(engine, tracked, origin, storage, (None, None))
    }

    /// On files: a temporary origin file and an unnamed temporary storage
    /// file in a temporary directory (grown by the engine).
    fn files(seed: u8) -> Self {
        let (file, origin) = temp_file_device(seed);
        let engine = Engine::new(Config::default()).expect("engine");
        let origin: Arc<dyn BlockDevice> = Arc::new(origin);
        let tracked = engine.attach("origin", origin.clone()).expect("attach");
        let dir = tempfile::tempdir_in(std::env::temp_dir()).expect("temp dir");
        let storage = StorageSpec::Path(dir.path().to_path_buf());
        Self::new(engine, tracked, origin, storage, (Some(file), Some(dir)))
    }

    fn new(
        engine: Engine,
        tracked: Arc<TrackedDevice>,
        origin: Arc<dyn BlockDevice>,
        storage: StorageSpec,
        files: (Option<NamedTempFile>, Option<TempDir>),
    ) -> Self {
        let mut rig = Self {
            engine,
            tracked,
            origin,
            storage,
            snapshot: None,
            chunk_size: 0,
            chunks: 0,
            _files: files,
        };
        rig.retake();
        assert!(rig.chunks.is_power_of_two(), "chunk count {}", rig.chunks);
        rig
    }

    /// Destroys the current snapshot (if any) and takes a fresh one: every
    /// chunk is uncopied again.
    fn retake(&mut self) {
        if let Some(id) = self.snapshot.take() {
            self.engine.snapshot_destroy(&id).expect("destroy");
        }
        let id = self
            .engine
            .snapshot_create(self.storage.clone(), SnapshotOptions::default())
            .expect("create");
        self.engine.snapshot_add(&id, "origin").expect("add");
        self.engine.snapshot_take(&id).expect("take");
        self.snapshot = Some(id);
        let image = self.image();
        self.chunk_size = image.chunk_size();
        self.chunks = image.size().div_ceil(self.chunk_size);
    }

    fn image(&self) -> Image {
        self.engine.image("origin").expect("image")
    }

    /// Fails loudly if a copy failed: the default policy would let the
    /// origin writes through without copying and the numbers would lie.
    fn assert_valid(&self) {
        assert_eq!(self.image().error_code(), 0, "snapshot image corrupted");
    }

    /// Offset of a 4 KiB write inside chunk `chunk`, varied with `i`.
    fn write_offset(&self, chunk: u64, i: u64) -> u64 {
        let blocks_per_chunk = self.chunk_size / BLOCK as u64;
        chunk * self.chunk_size + (i * 7 % blocks_per_chunk) * BLOCK as u64
    }
}

// ---------------------------------------------------------------------------
// first_write_copies

fn first_write_copies(c: &mut Criterion) {
    let mut group = c.benchmark_group("first_write_copies");
    group.throughput(Throughput::Bytes(BLOCK as u64));
    let buf = pattern(BLOCK, 9);

    for (backend, make) in [
        ("mem", SnapshotRig::memory as fn(u8) -> SnapshotRig),
        ("file", SnapshotRig::files),
    ] {
        let mut rig = make(3);

        // Each write goes to a chunk not copied yet; when every chunk of the
        // snapshot is copied, a new snapshot is taken (not timed).
        let mut next = 0u64;
        group.bench_function(format!("{backend}/first_write"), |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                let mut done = 0;
                while done < iters {
                    if next == rig.chunks {
                        rig.assert_valid();
                        rig.retake();
                        next = 0;
                    }
                    let batch = (iters - done).min(rig.chunks - next);
                    let start = Instant::now();
                    for _ in 0..batch {
                        let offset = rig.write_offset(scatter(next, rig.chunks), next);
                        rig.tracked.write(black_box(&buf), offset).unwrap();
                        next += 1;
                    }
                    timed += start.elapsed();
                    done += batch;
                }
                timed
            })
        });
        rig.assert_valid();

        // Every chunk copied once, then 4 KiB writes all over the device.
        rig.retake();
        for chunk in 0..rig.chunks {
            rig.tracked
                .write(&buf, chunk * rig.chunk_size)
                .expect("copy chunk");
        }
        let blocks = REGION / BLOCK as u64;
        let mut i = 0u64;
        group.bench_function(format!("{backend}/rewrite"), |b| {
            b.iter(|| {
                let offset = scatter(i, blocks) * BLOCK as u64;
                i += 1;
                rig.tracked.write(black_box(&buf), offset).unwrap();
            })
        });
        rig.assert_valid();
    }
    group.finish();
}

// ---------------------------------------------------------------------------
// image_read

fn image_read(c: &mut Criterion) {
    let mut group = c.benchmark_group("image_read");

    for (backend, make) in [
        ("mem", SnapshotRig::memory as fn(u8) -> SnapshotRig),
        ("file", SnapshotRig::files),
    ] {
        const TAKE_SEED: u8 = 5;
        let rig = make(TAKE_SEED);
        let half = REGION / 2;
        // Copy every chunk of the first half: origin writes there, after
        // the take, with new content.
        let new = pattern(BLOCK, 200);
        for chunk in 0..half / rig.chunk_size {
            rig.tracked
                .write(&new, chunk * rig.chunk_size)
                .expect("copy chunk");
        }
        let image = rig.image();
        let origin = rig.origin.clone();

        // The image still reads the take-time content on both halves.
        let expected = pattern(MIB, TAKE_SEED);
        let mut got = vec![0u8; MIB];
        for offset in [0, half - MIB as u64, half, REGION - MIB as u64] {
            image.read(&mut got, offset).expect("image read");
            assert!(got == expected, "image content wrong at {offset}");
        }

        for size in [MIB, BLOCK] {
            group.throughput(Throughput::Bytes(size as u64));
            let label = if size == MIB { "1MiB" } else { "4KiB" };
            let positions = half / size as u64;
            let mut buf = vec![0u8; size];

            // Origin reads over the uncopied half, like the uncopied image
            // reads below.
            let mut i = 0u64;
            group.bench_function(format!("{backend}/{label}/origin_direct"), |b| {
                b.iter(|| {
                    let offset = half + scatter(i, positions) * size as u64;
                    i += 1;
                    origin.read_at(black_box(&mut buf), offset).unwrap();
                })
            });
            let mut i = 0u64;
            group.bench_function(format!("{backend}/{label}/image_uncopied"), |b| {
                b.iter(|| {
                    let offset = half + scatter(i, positions) * size as u64;
                    i += 1;
                    image.read(black_box(&mut buf), offset).unwrap();
                })
            });
            let mut i = 0u64;
            group.bench_function(format!("{backend}/{label}/image_copied"), |b| {
                b.iter(|| {
                    let offset = scatter(i, positions) * size as u64;
                    i += 1;
                    image.read(black_box(&mut buf), offset).unwrap();
                })
            });
        }
        rig.assert_valid();
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = config(Criterion::default());
    targets = write_path, first_write_copies, image_read
}
criterion_main!(benches);
