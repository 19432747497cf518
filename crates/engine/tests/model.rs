//! Model-based property test of the engine: random sequences of writes,
//! discards and write-zeroes (unaligned, across chunk and tracking-block
//! borders, touching the short last chunk), takes, image reads and writes,
//! mark-dirty and destroys on 1 to 4 in-memory devices, checked after every
//! step against a reference model:
//! - every origin equals what users wrote to it;
//! - every image equals the origin at its take plus the image's own writes
//!   (or, once the engine reports the image corrupted, refuses reads);
//! - every readable CBT map, change number and block size equals the model's.

use std::sync::Arc;

use blksnap_engine::{
    BlockDevice, Config, Engine, Error, MemDevice, SectorRange, SnapshotOptions, StorageSpec,
};
use blksnap_test_support::Pattern;
use common::{mem_storage, snapshot_of};
use proptest::prelude::*;
use uuid::Uuid;

mod common;

#[derive(Debug, Clone)]
enum Op {
    Write { dev: usize, pos: Pos, seed: u64 },
    Discard { dev: usize, pos: Pos },
    WriteZeroes { dev: usize, pos: Pos },
    Take { devices: u8, storage: u8 },
    ImageRead { dev: usize, pos: Pos },
    ImageWrite { dev: usize, pos: Pos, seed: u64 },
    MarkDirty { dev: usize, pos: Pos },
    Destroy { which: usize },
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
}

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
    snapshots: Vec<Uuid>,
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
            ..Config::default()
        };
        let engine = Engine::new(config).unwrap();
        let mut model = Vec::new();
        for (i, (&size, &min_io)) in setup.sizes.iter().zip(&setup.min_io).enumerate() {
            let device = Arc::new(MemDevice::with_min_io(size, min_io));
            engine.attach(&name(i), device).unwrap();
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
            });
        }
        Self {
            engine,
            setup,
            model,
            snapshots: Vec::new(),
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
                device
                    .write(&data, offset)
                    .expect("origin writes always succeed");
                let m = &mut self.model[dev];
                m.origin[offset as usize..(offset + len) as usize].copy_from_slice(&data);
                m.mark(offset, len);
            }
            Op::Discard { dev, pos } | Op::WriteZeroes { dev, pos } => {
                let dev = dev % n;
                let (offset, len) = pos.resolve(self.setup.sizes[dev]);
                let device = self.engine.device(&name(dev)).unwrap();
                if matches!(op, Op::Discard { .. }) {
                    device.discard(offset, len).unwrap();
                } else {
                    device.write_zeroes(offset, len).unwrap();
                }
                let m = &mut self.model[dev];
                m.origin[offset as usize..(offset + len) as usize].fill(0);
                m.mark(offset, len);
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
                let m = &mut self.model[dev];
                match image.write(&data, offset) {
                    Ok(()) => {
                        if let Some(Some(content)) = &mut m.image {
                            content[offset as usize..(offset + len) as usize]
                                .copy_from_slice(&data);
                        }
                        m.mark(offset, len);
                    }
                    Err(Error::NoSpace { .. } | Error::Corrupted { .. }) => {
                        // Part of the write may have landed: the image content
                        // is no longer known exactly. The change map is only
                        // marked after a complete image write.
                        m.image = Some(None);
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
        let need: u64 = chosen
            .iter()
            .map(|&d| self.setup.sizes[d].next_multiple_of(self.expected_chunk_size(d)))
            .sum();
        let (spec, ranges) = match storage_kind {
            0 => (mem_storage(need), None),
            1 => {
                // Three ranges of an odd-sized device, appended after the
                // take; each wastes at most a chunk at its tail.
                let piece = (need / 3 + (1 << 16)).next_multiple_of(512);
                let backing: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(piece * 3 + 4096));
                let ranges: Vec<SectorRange> = (0..3)
                    .map(|i| SectorRange::new(8 + i * piece / 512, piece / 512))
                    .collect();
                (StorageSpec::Empty, Some((backing, ranges)))
            }
            _ => (mem_storage(need / 3 + 512), None),
        };
        let names: Vec<String> = chosen.iter().map(|&d| name(d)).collect();
        let id = snapshot_of(&self.engine, &names, spec, SnapshotOptions::default());
        if let Some((backing, ranges)) = ranges {
            self.engine
                .snapshot_append_storage_device(&id, backing, &ranges)
                .unwrap();
        }
        for &d in &chosen {
            let m = &mut self.model[d];
            m.take();
            m.snapshot = Some(id);
            let image = self.engine.image(&name(d)).unwrap();
            assert_eq!(image.chunk_size(), self.expected_chunk_size(d));
        }
        self.snapshots.push(id);
    }

    fn check_image_range(&self, dev: usize, offset: u64, len: u64) {
        let Some(Some(content)) = &self.model[dev].image else {
            return;
        };
        let image = self.engine.image(&name(dev)).unwrap();
        let mut buf = vec![0u8; len as usize];
        match image.read(&mut buf, offset) {
            Ok(()) => {
                assert_eq!(image.error_code(), 0);
                assert!(
                    buf == content[offset as usize..(offset + len) as usize],
                    "image of dev{dev} differs at {offset}+{len}"
                );
            }
            Err(Error::Corrupted { errno, .. }) => {
                assert_eq!(errno, 28, "only an overflow corrupts images here");
                assert_eq!(image.error_code(), 28);
            }
            Err(e) => panic!("unexpected image read error: {e}"),
        }
    }

    fn check(&self) {
        for (d, m) in self.model.iter().enumerate() {
            let device = self.engine.device(&name(d)).unwrap();
            let mut buf = vec![0u8; m.origin.len()];
            device.read(&mut buf, 0).unwrap();
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
            h.check();
        }
        // Destroy everything: origins are intact, tracking goes on.
        for id in std::mem::take(&mut h.snapshots) {
            h.engine.snapshot_destroy(&id).unwrap();
        }
        for m in &mut h.model {
            m.image = None;
            m.snapshot = None;
        }
        h.check();
    }
}
