//! Model-based property test of the engine: random sequences of writes,
//! discards and write-zeroes (unaligned, across chunk and tracking-block
//! borders, touching the short last chunk), takes, image reads and writes,
//! mark-dirty and destroys on 1 to 4 in-memory devices, checked after every
//! step against a reference model:
//! - every origin equals what users wrote to it;
//! - every image equals the origin at its take plus the image's own writes
//!   (or, once the engine reports the image corrupted, refuses reads);
//! - every readable CBT map, change number and block size equals the model's.
//!
//! Faults are injected too (EIO on origin reads or writes, on storage
//! writes), and the model predicts their effect: under the default policy a
//! copy that fails corrupts the image with EIO and the origin write goes on;
//! an origin write that fails leaves the origin as it was (but marked); an
//! image read of an uncopied chunk fails while origin reads fail. The one
//! outcome the model does not compute is a storage overflow (ENOSPC), which
//! it takes from the engine.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use blksnap_engine::{
    BlockDevice, Config, Engine, Error, MemDevice, SectorRange, SnapshotOptions, StorageSpec,
};
use blksnap_test_support::Pattern;
use proptest::prelude::*;
use uuid::Uuid;

#[derive(Debug, Clone)]
enum Op {
    Write {
        dev: usize,
        pos: Pos,
        seed: u64,
    },
    Discard {
        dev: usize,
        pos: Pos,
    },
    WriteZeroes {
        dev: usize,
        pos: Pos,
    },
    Take {
        devices: u8,
        storage: u8,
    },
    ImageRead {
        dev: usize,
        pos: Pos,
    },
    ImageWrite {
        dev: usize,
        pos: Pos,
        seed: u64,
    },
    MarkDirty {
        dev: usize,
        pos: Pos,
    },
    Destroy {
        which: usize,
    },
    /// EIO from now on (or no more) on a device's origin reads and writes.
    OriginFault {
        dev: usize,
        reads: bool,
        writes: bool,
    },
    /// EIO from now on (or no more) on writes into a snapshot's storage.
    StorageFault {
        which: usize,
        writes: bool,
    },
}

/// Where a request lands, resolved against the device size at run time.
#[derive(Debug, Clone, Copy)]
struct Pos {
    fraction: u32,
    /// Snap the offset to a 4 KiB border (a chunk or tracking-block border
    /// in the test configs) and shift it by `jitter` bytes.
    snap: bool,
    jitter: i16,
    len: u32,
}

impl Pos {
    fn resolve(self, size: u64) -> (u64, u64) {
        let mut offset = (self.fraction as u64 * size) >> 32;
        if self.snap {
            offset = (offset / 4096 * 4096).saturating_add_signed(self.jitter as i64);
        }
        let offset = offset.min(size - 1);
        let len = (self.len as u64).min(size - offset);
        (offset, len)
    }

    fn sectors(self, size: u64) -> SectorRange {
        let (offset, len) = self.resolve(size);
        let start = offset / 512;
        let end = (offset + len).div_ceil(512).min(size / 512);
        SectorRange::new(start, end.saturating_sub(start))
    }
}

fn pos() -> impl Strategy<Value = Pos> {
    let len = prop_oneof![
        Just(0u32),
        Just(1),
        Just(2),
        Just(511),
        Just(512),
        Just(4095),
        Just(4096),
        Just(4097),
        Just(8192),
        1u32..40_000,
    ];
    (any::<u32>(), any::<bool>(), -1100i16..1100, len).prop_map(|(fraction, snap, jitter, len)| {
        Pos {
            fraction,
            snap,
            jitter,
            len,
        }
    })
}

fn op() -> impl Strategy<Value = Op> {
    let dev = 0usize..4;
    prop_oneof![
        4 => (dev.clone(), pos(), any::<u64>()).prop_map(|(dev, pos, seed)| Op::Write { dev, pos, seed }),
        1 => (dev.clone(), pos()).prop_map(|(dev, pos)| Op::Discard { dev, pos }),
        1 => (dev.clone(), pos()).prop_map(|(dev, pos)| Op::WriteZeroes { dev, pos }),
        2 => (any::<u8>(), 0u8..3).prop_map(|(devices, storage)| Op::Take { devices, storage }),
        2 => (dev.clone(), pos()).prop_map(|(dev, pos)| Op::ImageRead { dev, pos }),
        2 => (dev.clone(), pos(), any::<u64>()).prop_map(|(dev, pos, seed)| Op::ImageWrite { dev, pos, seed }),
        1 => (dev.clone(), pos()).prop_map(|(dev, pos)| Op::MarkDirty { dev, pos }),
        1 => any::<usize>().prop_map(|which| Op::Destroy { which }),
        1 => (dev.clone(), prop::bool::weighted(0.3), prop::bool::weighted(0.3))
            .prop_map(|(dev, reads, writes)| Op::OriginFault { dev, reads, writes }),
        1 => (any::<usize>(), prop::bool::weighted(0.4))
            .prop_map(|(which, writes)| Op::StorageFault { which, writes }),
    ]
}

#[derive(Debug, Clone)]
struct Setup {
    sizes: Vec<u64>,
    min_io: Vec<u32>,
    tracking_shift: u32,
    tracking_max_count: u64,
    chunk_shift: u32,
    chunk_max_count: u64,
}

fn setup() -> impl Strategy<Value = Setup> {
    (
        prop::collection::vec(
            (
                20u64..320,
                prop_oneof![Just(512u32), Just(4096), Just(16384)],
            ),
            1..=4,
        ),
        12u32..=13,
        prop_oneof![Just(4u64), Just(16), Just(2_097_152)],
        12u32..=13,
        prop_oneof![Just(4u64), Just(1 << 22)],
    )
        .prop_map(
            |(devs, tracking_shift, tracking_max_count, chunk_shift, chunk_max_count)| Setup {
                sizes: devs.iter().map(|d| d.0 * 512).collect(),
                min_io: devs.iter().map(|d| d.1).collect(),
                tracking_shift,
                tracking_max_count,
                chunk_shift,
                chunk_max_count,
            },
        )
}

/// The reference model of one device.
struct ModelDevice {
    origin: Vec<u8>,
    block_shift: u32,
    live: Vec<u8>,
    readable: Vec<u8>,
    current: u8,
    previous: u8,
    /// The image of the device's taken snapshot; `None` when its content is
    /// no longer known exactly (an image write failed half way).
    image: Option<Option<Vec<u8>>>,
    snapshot: Option<Uuid>,
    /// Chunk size of the image, and its chunks copied to the storage.
    chunk: u64,
    copied: BTreeSet<u64>,
    /// The errno the image must be corrupted with, and whether an overflow
    /// may have come first (a storage write fault fails after allocation).
    corrupted: Option<(i32, bool)>,
    /// Injected: origin reads / writes fail with EIO.
    fail_reads: bool,
    fail_writes: bool,
}

const EIO: i32 = 5;
const ENOSPC: i32 = 28;

impl ModelDevice {
    fn mark(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = (offset >> self.block_shift) as usize;
        let last = ((offset + len - 1) >> self.block_shift) as usize;
        for b in &mut self.live[first..=last] {
            *b = self.current;
        }
    }

    /// An image write marks the live map and raises the readable map to
    /// the take's change number (DESIGN.md: the image's own changes show up
    /// to a consumer of that snapshot).
    fn mark_image_write(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        self.mark(offset, len);
        let first = (offset >> self.block_shift) as usize;
        let last = ((offset + len - 1) >> self.block_shift) as usize;
        for b in &mut self.readable[first..=last] {
            *b = (*b).max(self.previous);
        }
    }

    fn take(&mut self) {
        // The wrap needs 255 takes; the CBT tests cover it.
        assert!(self.current < 255);
        self.readable = self.live.clone();
        self.previous = self.current;
        self.current += 1;
        self.image = Some(Some(self.origin.clone()));
    }
}

struct Harness {
    engine: Engine,
    setup: Setup,
    model: Vec<ModelDevice>,
    origins: Vec<Arc<MemDevice>>,
    snapshots: Vec<Uuid>,
    /// Each snapshot's storage devices and whether their writes fail.
    storages: HashMap<Uuid, (Vec<Arc<MemDevice>>, bool)>,
}

fn name(dev: usize) -> String {
    format!("dev{dev}")
}

impl Harness {
    fn new(setup: Setup) -> Self {
        let config = Config {
            tracking_block_minimum_shift: setup.tracking_shift,
            tracking_block_maximum_count: setup.tracking_max_count,
            chunk_minimum_shift: setup.chunk_shift,
            chunk_maximum_shift: 16,
            chunk_maximum_count: setup.chunk_max_count,
            diff_storage_minimum: 1 << 16,
            // Overflows are part of the model: fail them at once.
            storage_wait: std::time::Duration::ZERO,
            ..Config::default()
        };
        let engine = Engine::new(config).unwrap();
        let mut model = Vec::new();
        let mut origins = Vec::new();
        for (i, (&size, &min_io)) in setup.sizes.iter().zip(&setup.min_io).enumerate() {
            let device = Arc::new(MemDevice::with_min_io(size, min_io));
            engine.attach(&name(i), device.clone()).unwrap();
            // Independent statement of the sizing rule of DESIGN.md.
            let mut block_shift = setup.tracking_shift;
            while size.div_ceil(1 << block_shift) > setup.tracking_max_count && block_shift < 26 {
                block_shift += 1;
            }
            let blocks = size.div_ceil(1 << block_shift) as usize;
            model.push(ModelDevice {
                origin: vec![0; size as usize],
                block_shift,
                live: vec![0; blocks],
                readable: vec![0; blocks],
                current: 1,
                previous: 0,
                image: None,
                snapshot: None,
                chunk: 0,
                copied: BTreeSet::new(),
                corrupted: None,
                fail_reads: false,
                fail_writes: false,
            });
            origins.push(device);
        }
        Self {
            engine,
            setup,
            model,
            origins,
            snapshots: Vec::new(),
            storages: HashMap::new(),
        }
    }

    fn expected_chunk_size(&self, dev: usize) -> u64 {
        let size = self.setup.sizes[dev];
        let io_shift = self.setup.min_io[dev].trailing_zeros();
        let mut shift = self.setup.chunk_shift.max(io_shift).min(16);
        while size.div_ceil(1 << shift) > self.setup.chunk_max_count && shift < 16 {
            shift += 1;
        }
        1 << shift
    }

    fn run(&mut self, op: &Op) {
        let n = self.model.len();
        match *op {
            Op::Write { dev, pos, seed } => {
                let dev = dev % n;
                let (offset, len) = pos.resolve(self.setup.sizes[dev]);
                let data = Pattern::Random.bytes(seed, len);
                let device = self.engine.device(&name(dev)).unwrap();
                let result = device.write(&data, offset);
                self.origin_write(dev, offset, &data, result);
            }
            Op::Discard { dev, pos } | Op::WriteZeroes { dev, pos } => {
                let dev = dev % n;
                let (offset, len) = pos.resolve(self.setup.sizes[dev]);
                let device = self.engine.device(&name(dev)).unwrap();
                let result = if matches!(op, Op::Discard { .. }) {
                    device.discard(offset, len)
                } else {
                    device.write_zeroes(offset, len)
                };
                self.origin_write(dev, offset, &vec![0; len as usize], result);
            }
            Op::OriginFault { dev, reads, writes } => {
                let dev = dev % n;
                self.origins[dev].set_fail_reads(reads);
                self.origins[dev].set_fail_writes(writes);
                let m = &mut self.model[dev];
                (m.fail_reads, m.fail_writes) = (reads, writes);
            }
            Op::StorageFault { which, writes } => {
                if self.snapshots.is_empty() {
                    return;
                }
                let id = self.snapshots[which % self.snapshots.len()];
                let (devices, fail) = self.storages.get_mut(&id).unwrap();
                for d in devices.iter() {
                    d.set_fail_writes(writes);
                }
                *fail = writes;
            }
            Op::Take { devices, storage } => self.take(devices, storage),
            Op::ImageRead { dev, pos } => {
                let dev = dev % n;
                let (offset, len) = pos.resolve(self.setup.sizes[dev]);
                self.check_image_range(dev, offset, len);
            }
            Op::ImageWrite { dev, pos, seed } => {
                let dev = dev % n;
                if self.model[dev].image.is_none() {
                    return;
                };
                let (offset, len) = pos.resolve(self.setup.sizes[dev]);
                let data = Pattern::Random.bytes(seed, len);
                let image = self.engine.image(&name(dev)).unwrap();
                let usable = image.error_code() == 0;
                let faulted = self.storage_faulted(dev) || self.model[dev].fail_reads;
                let m = &mut self.model[dev];
                match image.write(&data, offset) {
                    Ok(()) => {
                        if let Some(Some(content)) = &mut m.image {
                            content[offset as usize..(offset + len) as usize]
                                .copy_from_slice(&data);
                        }
                        if len > 0 {
                            let chunks = offset / m.chunk..=(offset + len - 1) / m.chunk;
                            m.copied.extend(chunks);
                        }
                        m.mark_image_write(offset, len);
                    }
                    Err(Error::Io { source, .. })
                        if faulted && source.raw_os_error() == Some(EIO) =>
                    {
                        // An injected fault: the copy or the data write
                        // failed; the image is not corrupted by it.
                        m.image = Some(None);
                        m.mark_image_write(offset, len);
                    }
                    Err(Error::NoSpace { .. } | Error::Corrupted { .. }) => {
                        // Part of the write may have landed: the image content
                        // is no longer known exactly. A write to a usable
                        // image marks the maps before it starts.
                        m.image = Some(None);
                        if usable {
                            m.mark_image_write(offset, len);
                        }
                    }
                    Err(e) => panic!("unexpected image write error: {e}"),
                }
            }
            Op::MarkDirty { dev, pos } => {
                let dev = dev % n;
                let range = pos.sectors(self.setup.sizes[dev]);
                self.engine.mark_dirty(&name(dev), &[range]).unwrap();
                self.model[dev].mark(range.byte_offset(), range.byte_len());
            }
            Op::Destroy { which } => {
                if self.snapshots.is_empty() {
                    return;
                }
                let id = self.snapshots.remove(which % self.snapshots.len());
                self.storages.remove(&id);
                let image = self
                    .model
                    .iter()
                    .position(|m| m.snapshot == Some(id))
                    .map(|d| self.engine.image(&name(d)).unwrap());
                self.engine.snapshot_destroy(&id).unwrap();
                for m in &mut self.model {
                    if m.snapshot == Some(id) {
                        m.snapshot = None;
                        m.image = None;
                    }
                }
                if let Some(image) = image {
                    let mut buf = [0u8; 1];
                    assert!(matches!(image.read(&mut buf, 0), Err(Error::NotFound(_))));
                }
            }
        }
    }

    fn take(&mut self, mask: u8, storage_kind: u8) {
        let chosen: Vec<usize> = (0..self.model.len())
            .filter(|&d| mask & (1 << d) != 0 && self.model[d].snapshot.is_none())
            .collect();
        if chosen.is_empty() {
            return;
        }
        let mut storage_devices: Vec<Arc<MemDevice>> = Vec::new();
        let need: u64 = chosen
            .iter()
            .map(|&d| self.setup.sizes[d].next_multiple_of(self.expected_chunk_size(d)))
            .sum();
        let (spec, ranges) = match storage_kind {
            0 => {
                let storage = Arc::new(MemDevice::new(need));
                storage_devices.push(storage.clone());
                (StorageSpec::Device(storage), None)
            }
            1 => {
                // Three ranges of an odd-sized device, one appended before
                // the take (a take needs room for a chunk), two after; each
                // wastes at most a chunk at its tail.
                let piece = (need / 3 + (1 << 16)).next_multiple_of(512);
                let backing_mem = Arc::new(MemDevice::new(piece * 3 + 4096));
                storage_devices.push(backing_mem.clone());
                let backing: Arc<dyn BlockDevice> = backing_mem;
                let ranges: Vec<SectorRange> = (0..3)
                    .map(|i| SectorRange::new(8 + i * piece / 512, piece / 512))
                    .collect();
                (StorageSpec::Empty, Some((backing, ranges)))
            }
            // Too small for every chunk (overflows), but a take needs room
            // for one.
            _ => {
                let chunk = chosen.iter().map(|&d| self.expected_chunk_size(d)).max();
                let size = (need / 3 + 512).max(chunk.unwrap_or(0));
                let storage = Arc::new(MemDevice::new(size));
                storage_devices.push(storage.clone());
                (StorageSpec::Device(storage), None)
            }
        };
        let id = self
            .engine
            .snapshot_create(spec, SnapshotOptions::default())
            .unwrap();
        for &d in &chosen {
            self.engine.snapshot_add(&id, &name(d)).unwrap();
        }
        if let Some((backing, ranges)) = &ranges {
            self.engine
                .snapshot_append_storage_device(&id, backing.clone(), &ranges[..1])
                .unwrap();
        }
        self.engine.snapshot_take(&id).unwrap();
        if let Some((backing, ranges)) = ranges {
            self.engine
                .snapshot_append_storage_device(&id, backing, &ranges[1..])
                .unwrap();
        }
        self.storages.insert(id, (storage_devices, false));
        for &d in &chosen {
            let chunk = self.expected_chunk_size(d);
            let m = &mut self.model[d];
            m.take();
            m.snapshot = Some(id);
            m.chunk = chunk;
            m.copied.clear();
            m.corrupted = None;
            let image = self.engine.image(&name(d)).unwrap();
            assert_eq!(image.chunk_size(), self.expected_chunk_size(d));
        }
        self.snapshots.push(id);
    }

    fn storage_faulted(&self, dev: usize) -> bool {
        self.model[dev]
            .snapshot
            .and_then(|id| self.storages.get(&id))
            .is_some_and(|(_, fail)| *fail)
    }

    /// An origin write (or discard, write-zeroes) of `data` at `offset` and
    /// what the engine answered: the copies it needed (failing with an
    /// injected fault), the change map, the origin.
    fn origin_write(&mut self, dev: usize, offset: u64, data: &[u8], result: Result<(), Error>) {
        let len = data.len() as u64;
        if len == 0 {
            assert!(result.is_ok(), "zero-length write: {result:?}");
            return;
        }
        let storage_faulted = self.storage_faulted(dev);
        let m = &mut self.model[dev];
        if matches!(m.image, Some(Some(_))) && m.corrupted.is_none() {
            for chunk in offset / m.chunk..=(offset + len - 1) / m.chunk {
                if m.copied.contains(&chunk) {
                    continue;
                }
                // The copy reads the origin first, then allocates, then
                // writes the storage.
                if m.fail_reads {
                    m.corrupted = Some((EIO, false));
                    break;
                }
                if storage_faulted {
                    m.corrupted = Some((EIO, true));
                    break;
                }
                m.copied.insert(chunk);
            }
        }
        m.mark(offset, len);
        if m.fail_writes {
            match result {
                Err(e) => assert_eq!(e.errno(), EIO, "{e}"),
                Ok(()) => panic!("an origin write with failing writes succeeded"),
            }
        } else {
            result.expect("origin writes succeed under keep-origin-writes");
            m.origin[offset as usize..(offset + len) as usize].copy_from_slice(data);
        }
    }

    /// Takes what the model does not compute from the engine: an overflow.
    /// Everything else about corruption must be as predicted.
    fn reconcile(&mut self) {
        for (d, m) in self.model.iter_mut().enumerate() {
            if !matches!(m.image, Some(Some(_))) {
                continue;
            }
            let code = self.engine.image(&name(d)).unwrap().error_code();
            match m.corrupted {
                None | Some((_, true)) if code == ENOSPC => m.corrupted = Some((ENOSPC, false)),
                expected => assert_eq!(
                    code,
                    expected.map_or(0, |(errno, _)| errno),
                    "corruption of the image of dev{d}"
                ),
            }
        }
    }

    fn check_image_range(&self, dev: usize, offset: u64, len: u64) {
        let m = &self.model[dev];
        let Some(Some(content)) = &m.image else {
            return;
        };
        let image = self.engine.image(&name(dev)).unwrap();
        let mut buf = vec![0u8; len as usize];
        let result = image.read(&mut buf, offset);
        if let Some((errno, _)) = m.corrupted {
            match result {
                Err(Error::Corrupted { errno: got, .. }) => assert_eq!(got, errno),
                other => panic!("a corrupted image (errno {errno}) read {other:?}"),
            }
            return;
        }
        let uncopied = len > 0
            && (offset / m.chunk..=(offset + len - 1) / m.chunk).any(|c| !m.copied.contains(&c));
        if m.fail_reads && uncopied {
            match result {
                Err(Error::Io { source, .. }) => assert_eq!(source.raw_os_error(), Some(EIO)),
                other => panic!("an image read over failing origin reads gave {other:?}"),
            }
            assert_eq!(image.error_code(), 0, "a failed read corrupts nothing");
            return;
        }
        result.unwrap_or_else(|e| panic!("image read of dev{dev} at {offset}+{len}: {e}"));
        assert_eq!(image.error_code(), 0);
        assert!(
            buf == content[offset as usize..(offset + len) as usize],
            "image of dev{dev} differs at {offset}+{len}"
        );
    }

    fn check(&self) {
        for (d, m) in self.model.iter().enumerate() {
            let device = self.engine.device(&name(d)).unwrap();
            let mut buf = vec![0u8; m.origin.len()];
            if m.fail_reads {
                assert!(device.read(&mut buf, 0).is_err(), "failing origin read");
                buf = self.origins[d].contents();
            } else {
                device.read(&mut buf, 0).unwrap();
            }
            assert!(buf == m.origin, "origin of dev{d} differs from the model");
            self.check_image_range(d, 0, m.origin.len() as u64);
            let info = self.engine.cbt_info(&name(d)).unwrap();
            assert_eq!(info.block_size, 1 << m.block_shift);
            assert_eq!(info.block_count, m.live.len() as u64);
            assert_eq!(
                (info.changes_number, info.current_number),
                (m.previous, m.current)
            );
            assert_eq!(
                self.engine.read_cbt_map(&name(d)).unwrap(),
                m.readable,
                "readable map of dev{d}"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn engine_matches_model(setup in setup(), ops in prop::collection::vec(op(), 1..60)) {
        let mut h = Harness::new(setup);
        for op in &ops {
            h.run(op);
            h.reconcile();
            h.check();
        }
        // Destroy everything: origins are intact, tracking goes on.
        for id in std::mem::take(&mut h.snapshots) {
            h.engine.snapshot_destroy(&id).unwrap();
        }
        for m in &mut h.model {
            m.image = None;
            m.snapshot = None;
            m.corrupted = None;
        }
        h.check();
    }
}
