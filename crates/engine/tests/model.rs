//! Model-based property test of the engine: random sequences of writes,
//! discards and write-zeroes (unaligned, across chunk and tracking-block
//! borders, touching the short last chunk), takes (of device storage, of
//! appended ranges, of growing file and directory storage, under either
//! failure policy), storage appended at any time, image reads and writes,
//! mark-dirty, destroys (also of snapshots never taken), detach and
//! re-attach, and runs of hundreds of takes that wrap the change number, on
//! 1 to 4 in-memory devices, checked after every step against a reference
//! model:
//! - every origin equals what users wrote to it;
//! - every image equals the origin at its take plus the image's own writes
//!   (or, once it is corrupted, refuses reads with the predicted errno);
//! - every readable CBT map, change number, block size and generation
//!   equals the model's (the generation changes exactly at a wrap or a
//!   re-attach);
//! - every difference storage's size and use equal those of a simulated
//!   allocator (extents filled in order, tails too short for the next chunk
//!   skipped, slots of failed copies reused first, growth by steps at
//!   creation and when free space falls to half a step, up to the limit).
//!
//! Nothing is taken from the engine: faults are injected (EIO on origin
//! reads or writes, on storage writes) and storage overflows happen, and
//! the model predicts the outcome of every request exactly: which copies
//! succeed, which image corrupts with which errno (keep-origin-writes), which
//! origin write is refused with which errno (break-origin-write), which part
//! of a failing image write landed.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use blksnap_engine::{
    BlockDevice, Config, CopyErrorPolicy, Engine, Error, MemDevice, SectorRange, SnapshotOptions,
    StorageSpec,
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
    /// Create a snapshot of the free devices in the mask, add them, and
    /// (unless `take` is false) take it.
    Take {
        devices: u8,
        storage: StorageChoice,
        break_writes: bool,
        take: bool,
    },
    /// Take a snapshot that was created but not taken (maybe refused for
    /// lack of storage before).
    TakePending {
        which: usize,
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
    /// Destroy a snapshot, taken or not.
    Destroy {
        which: usize,
    },
    /// Append sector ranges to a snapshot's storage, taken or not.
    Append {
        which: usize,
        size: u8,
        extra: u16,
        two: bool,
    },
    /// Detach a device and attach it again (refused while in a snapshot).
    Reattach {
        dev: usize,
    },
    /// Take and destroy a snapshot of the free devices in the mask `count`
    /// times (the change number wraps after 254 takes).
    Cycle {
        devices: u8,
        count: u8,
    },
    /// EIO from now on (or no more) on a device's origin reads and writes.
    OriginFault {
        dev: usize,
        reads: bool,
        writes: bool,
    },
    /// EIO from now on (or no more) on writes into a snapshot's storage
    /// devices (not its files).
    StorageFault {
        which: usize,
        writes: bool,
    },
}

/// The storage of a take, resolved against the devices at run time.
#[derive(Debug, Clone, Copy)]
struct StorageChoice {
    kind: u8,
    limit: u8,
    initial: u8,
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
    let storage = (0u8..6, 0u8..5, 0u8..3).prop_map(|(kind, limit, initial)| StorageChoice {
        kind,
        limit,
        initial,
    });
    prop_oneof![
        4 => (dev.clone(), pos(), any::<u64>()).prop_map(|(dev, pos, seed)| Op::Write { dev, pos, seed }),
        1 => (dev.clone(), pos()).prop_map(|(dev, pos)| Op::Discard { dev, pos }),
        1 => (dev.clone(), pos()).prop_map(|(dev, pos)| Op::WriteZeroes { dev, pos }),
        3 => (any::<u8>(), storage, prop::bool::weighted(0.3), prop::bool::weighted(0.85))
            .prop_map(|(devices, storage, break_writes, take)| Op::Take { devices, storage, break_writes, take }),
        1 => any::<usize>().prop_map(|which| Op::TakePending { which }),
        2 => (dev.clone(), pos()).prop_map(|(dev, pos)| Op::ImageRead { dev, pos }),
        2 => (dev.clone(), pos(), any::<u64>()).prop_map(|(dev, pos, seed)| Op::ImageWrite { dev, pos, seed }),
        1 => (dev.clone(), pos()).prop_map(|(dev, pos)| Op::MarkDirty { dev, pos }),
        1 => any::<usize>().prop_map(|which| Op::Destroy { which }),
        1 => (any::<usize>(), 0u8..5, any::<u16>(), any::<bool>())
            .prop_map(|(which, size, extra, two)| Op::Append { which, size, extra, two }),
        1 => dev.clone().prop_map(|dev| Op::Reattach { dev }),
        1 => (any::<u8>(), prop_oneof![Just(1u8), Just(2), Just(127), Just(253), Just(254)])
            .prop_map(|(devices, count)| Op::Cycle { devices, count }),
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

/// Growth step of file and directory storage (the least the config allows
/// with 64 KiB chunks).
const STEP: u64 = 1 << 16;
const EIO: i32 = 5;
const EINVAL: i32 = 22;
const ENOSPC: i32 = 28;

/// Where a chunk lives in the model's storage: an extent and a byte offset.
type Slot = (usize, u64);

/// The difference storage of one snapshot as the allocator of
/// `diff_storage.rs` must manage it (DESIGN.md §2 "Difference storage").
#[derive(Debug, Default)]
struct StorageModel {
    /// Each extent's length and whether its writes fail with the storage
    /// fault (memory devices do; files do not).
    extents: Vec<(u64, bool)>,
    /// The bump pointer: current extent and offset in it.
    extent: usize,
    next: u64,
    total: u64,
    used: u64,
    /// Slots of failed copies with their length, reused first.
    free: Vec<(u64, Slot)>,
    growable: bool,
    limit: Option<u64>,
    /// The injected storage write fault, and the devices it applies to.
    faulted: bool,
    devices: Vec<Arc<MemDevice>>,
}

impl StorageModel {
    fn push(&mut self, len: u64, faultable: bool) {
        self.extents.push((len, faultable));
        self.total += len;
    }

    fn take_from_extents(&mut self, len: u64) -> Option<Slot> {
        while let Some(&(extent_len, _)) = self.extents.get(self.extent) {
            if extent_len - self.next >= len {
                let slot = (self.extent, self.next);
                self.next += len;
                self.used += len;
                return Some(slot);
            }
            // The tail is too short for this chunk: skipped, counted used.
            self.used += extent_len - self.next;
            self.extent += 1;
            self.next = 0;
        }
        None
    }

    /// One growth step (less at the limit), if it holds `need` bytes.
    fn grow(&mut self, need: u64) -> bool {
        if !self.growable {
            return false;
        }
        let room = self
            .limit
            .map_or(u64::MAX, |l| l.saturating_sub(self.total));
        let by = STEP.min(room) / 512 * 512;
        if by == 0 || by < need {
            return false;
        }
        self.push(by, false);
        true
    }

    /// At creation: a growable storage with less than half a step free
    /// grows a step (less at the limit), as an allocation would.
    fn grow_ahead(&mut self) {
        if self.total - self.used < STEP / 2 {
            self.grow(0);
        }
    }

    /// A slot for a chunk of `len` bytes, or `None`: ENOSPC.
    fn allocate(&mut self, len: u64) -> Option<Slot> {
        let len = len.next_multiple_of(512);
        loop {
            if let Some(i) = self.free.iter().position(|&(l, _)| l >= len) {
                let (held, slot) = self.free.swap_remove(i);
                self.used += held;
                return Some(slot);
            }
            if let Some(slot) = self.take_from_extents(len) {
                if self.total - self.used < STEP / 2 {
                    self.grow(len);
                }
                return Some(slot);
            }
            if !self.grow(len) {
                return None;
            }
        }
    }

    fn release(&mut self, slot: Slot, len: u64) {
        let len = len.next_multiple_of(512);
        self.used -= len;
        self.free.push((len, slot));
    }

    fn can_hold(&self, len: u64) -> bool {
        let len = len.next_multiple_of(512);
        let free = self.free.iter().any(|&(l, _)| l >= len);
        let fits = self
            .extents
            .iter()
            .enumerate()
            .skip(self.extent)
            .any(|(i, &(l, _))| l - if i == self.extent { self.next } else { 0 } >= len);
        let may_grow = self.growable
            && self
                .limit
                .is_none_or(|l| l.saturating_sub(self.total) >= len);
        free || fits || may_grow
    }

    fn write_fails(&self, slot: Slot) -> bool {
        self.faulted && self.extents[slot.0].1
    }

    fn set_fault(&mut self, fail: bool) {
        self.faulted = fail;
        for d in &self.devices {
            d.set_fail_writes(fail);
        }
    }
}

struct SnapModel {
    id: Uuid,
    devices: Vec<usize>,
    taken: bool,
    break_writes: bool,
    storage: StorageModel,
    /// A regular file used as storage and its length before: restored when
    /// the snapshot goes.
    file: Option<(PathBuf, u64)>,
}

/// The reference model of one device.
struct ModelDevice {
    origin: Vec<u8>,
    block_shift: u32,
    live: Vec<u8>,
    readable: Vec<u8>,
    current: u8,
    previous: u8,
    /// Counts generation changes (wraps, re-attaches).
    generation: u32,
    /// The image of the device's taken snapshot.
    image: Option<Vec<u8>>,
    snapshot: Option<Uuid>,
    /// Chunk size of the image, and its chunks copied to the storage.
    chunk: u64,
    copied: BTreeMap<u64, Slot>,
    /// The errno the image is corrupted with.
    corrupted: Option<i32>,
    /// Injected: origin reads / writes fail with EIO.
    fail_reads: bool,
    fail_writes: bool,
}

impl ModelDevice {
    fn new(size: u64, block_shift: u32) -> Self {
        let blocks = size.div_ceil(1 << block_shift) as usize;
        Self {
            origin: vec![0; size as usize],
            block_shift,
            live: vec![0; blocks],
            readable: vec![0; blocks],
            current: 1,
            previous: 0,
            generation: 0,
            image: None,
            snapshot: None,
            chunk: 0,
            copied: BTreeMap::new(),
            corrupted: None,
            fail_reads: false,
            fail_writes: false,
        }
    }

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

    /// An image write or a mark-dirty marks the live map and raises the
    /// readable map to the last take's change number (DESIGN.md: the
    /// image's own changes show up to a consumer of that snapshot; the
    /// original's markdirtyblock marks both maps likewise).
    fn mark_live_and_readable(&mut self, offset: u64, len: u64) {
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

    /// The CBT switch of a take; at 256 it wraps (DESIGN.md: restart at 1,
    /// maps zeroed, new generation).
    fn switch(&mut self) {
        if self.current == 255 {
            self.live.fill(0);
            self.readable.fill(0);
            self.previous = 0;
            self.current = 1;
            self.generation += 1;
        } else {
            self.readable = self.live.clone();
            self.previous = self.current;
            self.current += 1;
        }
    }

    /// Re-attach: tracking starts afresh.
    fn reattach(&mut self) {
        self.live.fill(0);
        self.readable.fill(0);
        self.previous = 0;
        self.current = 1;
        self.generation += 1;
    }

    fn chunks(&self, offset: u64, len: u64) -> std::ops::RangeInclusive<u64> {
        offset / self.chunk..=(offset + len - 1) / self.chunk
    }
}

/// The copy of a chunk to the storage, as the engine does it: read the
/// origin, allocate, write the storage (giving the slot back when that
/// fails). The errno of the failure.
fn copy(m: &mut ModelDevice, storage: &mut StorageModel, chunk: u64) -> Result<Slot, i32> {
    if m.fail_reads {
        return Err(EIO);
    }
    let len = (m.origin.len() as u64 - chunk * m.chunk).min(m.chunk);
    let slot = storage.allocate(len).ok_or(ENOSPC)?;
    if storage.write_fails(slot) {
        // As the engine does: the slot goes back with the chunk's length,
        // even when it was a longer free slot reused (the difference stays
        // counted as used).
        storage.release(slot, len);
        return Err(EIO);
    }
    m.copied.insert(chunk, slot);
    Ok(slot)
}

/// The predicted outcome of a request.
#[derive(Debug, PartialEq)]
enum Expect {
    Ok,
    /// `Error::Corrupted` with this errno.
    Corrupted(i32),
    /// Any other error with this errno.
    Errno(i32),
}

fn assert_outcome(expect: Expect, result: Result<(), Error>, what: &str) {
    match (expect, result) {
        (Expect::Ok, Ok(())) => {}
        (Expect::Corrupted(errno), Err(Error::Corrupted { errno: got, .. })) => {
            assert_eq!(got, errno, "{what}: corrupted with the wrong errno")
        }
        (Expect::Errno(errno), Err(e)) if !matches!(e, Error::Corrupted { .. }) => {
            assert_eq!(e.errno(), errno, "{what}: {e}")
        }
        (expect, result) => panic!("{what}: expected {expect:?}, got {result:?}"),
    }
}

struct Harness {
    engine: Engine,
    setup: Setup,
    model: Vec<ModelDevice>,
    origins: Vec<Arc<MemDevice>>,
    snaps: Vec<SnapModel>,
    /// The generation each device had at the last check, and the model's
    /// count then.
    generations: Vec<(u32, Uuid)>,
    dir: tempfile::TempDir,
    files: usize,
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
            diff_storage_minimum: STEP,
            // Overflows are part of the model: fail them at once.
            storage_wait: std::time::Duration::ZERO,
            ..Config::default()
        };
        let engine = Engine::new(config).unwrap();
        let mut model = Vec::new();
        let mut origins = Vec::new();
        let mut generations = Vec::new();
        for (i, (&size, &min_io)) in setup.sizes.iter().zip(&setup.min_io).enumerate() {
            let device = Arc::new(MemDevice::with_min_io(size, min_io));
            engine.attach(&name(i), device.clone()).unwrap();
            // Independent statement of the sizing rule of DESIGN.md.
            let mut block_shift = setup.tracking_shift;
            while size.div_ceil(1 << block_shift) > setup.tracking_max_count && block_shift < 26 {
                block_shift += 1;
            }
            model.push(ModelDevice::new(size, block_shift));
            origins.push(device);
            generations.push((0, engine.cbt_info(&name(i)).unwrap().generation_id));
        }
        Self {
            engine,
            setup,
            model,
            origins,
            snaps: Vec::new(),
            generations,
            dir: tempfile::tempdir().unwrap(),
            files: 0,
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

    /// The least an appended range must hold: the snapshot's largest chunk.
    fn min_range(&self, devices: &[usize]) -> u64 {
        devices
            .iter()
            .map(|&d| self.expected_chunk_size(d))
            .max()
            .unwrap()
    }

    fn snap_index(&self, id: Uuid) -> usize {
        self.snaps.iter().position(|s| s.id == id).unwrap()
    }

    /// The device's image handle when it is in a taken snapshot; otherwise
    /// checks that the engine refuses one, as it must.
    fn image(&self, dev: usize) -> Option<blksnap_engine::Image> {
        let result = self.engine.image(&name(dev));
        match self.model[dev].snapshot {
            None => {
                assert!(matches!(result, Err(Error::NotFound(_))), "{result:?}");
                None
            }
            Some(id) if !self.snaps[self.snap_index(id)].taken => {
                assert!(matches!(result, Err(Error::WrongState(_))), "{result:?}");
                None
            }
            Some(_) => Some(result.unwrap()),
        }
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
                if self.snaps.is_empty() {
                    return;
                }
                let i = which % self.snaps.len();
                self.snaps[i].storage.set_fault(writes);
            }
            Op::Take {
                devices,
                storage,
                break_writes,
                take,
            } => self.create(devices, storage, break_writes, take),
            Op::TakePending { which } => {
                let pending: Vec<usize> = (0..self.snaps.len())
                    .filter(|&i| !self.snaps[i].taken)
                    .collect();
                if !pending.is_empty() {
                    self.take(pending[which % pending.len()]);
                }
            }
            Op::ImageRead { dev, pos } => {
                let dev = dev % n;
                let (offset, len) = pos.resolve(self.setup.sizes[dev]);
                if self.image(dev).is_some() {
                    self.check_image_range(dev, offset, len);
                }
            }
            Op::ImageWrite { dev, pos, seed } => {
                let dev = dev % n;
                let Some(image) = self.image(dev) else {
                    return;
                };
                let (offset, len) = pos.resolve(self.setup.sizes[dev]);
                let data = Pattern::Random.bytes(seed, len);
                let result = image.write(&data, offset);
                let expect = self.image_write(dev, offset, &data);
                assert_outcome(
                    expect,
                    result,
                    &format!("image write dev{dev} {offset}+{len}"),
                );
            }
            Op::MarkDirty { dev, pos } => {
                let dev = dev % n;
                let range = pos.sectors(self.setup.sizes[dev]);
                self.engine.mark_dirty(&name(dev), &[range]).unwrap();
                self.model[dev].mark_live_and_readable(range.byte_offset(), range.byte_len());
            }
            Op::Destroy { which } => {
                if !self.snaps.is_empty() {
                    self.destroy(which % self.snaps.len());
                }
            }
            Op::Append {
                which,
                size,
                extra,
                two,
            } => {
                if !self.snaps.is_empty() {
                    self.append(which % self.snaps.len(), size, extra, two);
                }
            }
            Op::Reattach { dev } => self.reattach(dev % n),
            Op::Cycle { devices, count } => self.cycle(devices, count),
        }
    }

    fn create(&mut self, mask: u8, choice: StorageChoice, break_writes: bool, take: bool) {
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
        let chunk = self.min_range(&chosen);
        let mut storage = StorageModel::default();
        let mut limit = None;
        let mut file = None;
        let mut ranges = None;
        let spec = match choice.kind {
            // Enough for every chunk.
            0 => {
                let device = Arc::new(MemDevice::new(need));
                storage.push(need, true);
                storage.devices.push(device.clone());
                StorageSpec::Device(device)
            }
            // Three ranges of an odd-sized device, one appended before the
            // take (a take needs room for a chunk), two after.
            1 => {
                let piece = (need / 3 + 1000).next_multiple_of(512).max(chunk);
                let backing = Arc::new(MemDevice::new(piece * 3 + 4096 + 300));
                storage.devices.push(backing.clone());
                let r: Vec<SectorRange> = (0..3)
                    .map(|i| SectorRange::new(8 + i * piece / 512, piece / 512))
                    .collect();
                ranges = Some((backing, r));
                StorageSpec::Empty
            }
            // Too small for every chunk, odd-sized; at least a chunk.
            2 => {
                let size = (need / 3 + 700).max(chunk);
                let device = Arc::new(MemDevice::new(size));
                storage.push(size / 512 * 512, true);
                storage.devices.push(device.clone());
                StorageSpec::Device(device)
            }
            // A directory: an unnamed file there, grown by steps.
            3 | 4 => {
                storage.growable = true;
                limit = match choice.limit {
                    0 | 1 => None,
                    2 => Some(chunk - 512),
                    3 => Some(need / 2 + 700),
                    _ => Some(STEP + chunk + 1536),
                };
                storage.limit = limit;
                if choice.kind == 3 {
                    StorageSpec::Path(self.dir.path().to_path_buf())
                } else {
                    // A regular file, used whole, then grown.
                    let initial = match choice.initial {
                        0 => 0,
                        1 => chunk + 300,
                        _ => need / 2 + 1300,
                    };
                    self.files += 1;
                    let path = self.dir.path().join(format!("storage{}", self.files));
                    std::fs::File::create(&path)
                        .unwrap()
                        .set_len(initial)
                        .unwrap();
                    if initial / 512 > 0 {
                        storage.push(initial / 512 * 512, false);
                    }
                    file = Some((path.clone(), initial));
                    StorageSpec::Path(path)
                }
            }
            // Nothing: the take is refused until storage is appended.
            _ => StorageSpec::Empty,
        };
        storage.grow_ahead();
        let options = SnapshotOptions {
            limit,
            on_copy_error: break_writes.then_some(CopyErrorPolicy::BreakOriginWrite),
            ..SnapshotOptions::default()
        };
        let id = self.engine.snapshot_create(spec, options).unwrap();
        for &d in &chosen {
            self.engine.snapshot_add(&id, &name(d)).unwrap();
            self.model[d].snapshot = Some(id);
        }
        if let Some((backing, r)) = &ranges {
            let device: Arc<dyn BlockDevice> = backing.clone();
            self.engine
                .snapshot_append_storage_device(&id, device, &r[..1])
                .unwrap();
            storage.push(r[0].byte_len(), true);
        }
        self.snaps.push(SnapModel {
            id,
            devices: chosen,
            taken: false,
            break_writes,
            storage,
            file,
        });
        if !take {
            return;
        }
        let i = self.snaps.len() - 1;
        if self.take(i) {
            if let Some((backing, r)) = ranges {
                let device: Arc<dyn BlockDevice> = backing;
                self.engine
                    .snapshot_append_storage_device(&id, device, &r[1..])
                    .unwrap();
                for r in &r[1..] {
                    self.snaps[i].storage.push(r.byte_len(), true);
                }
            }
        }
    }

    /// Takes snapshot `i`: refused with ENOSPC exactly when its storage can
    /// neither hold its largest chunk nor grow by it.
    fn take(&mut self, i: usize) -> bool {
        let id = self.snaps[i].id;
        let devices = self.snaps[i].devices.clone();
        let chunk = self.min_range(&devices);
        let result = self.engine.snapshot_take(&id);
        if !self.snaps[i].storage.can_hold(chunk) {
            match result {
                Err(e) => assert_eq!(e.errno(), ENOSPC, "take without room: {e}"),
                Ok(()) => panic!("a take without room for a chunk of {chunk} succeeded"),
            }
            return false;
        }
        result.expect("take with room for a chunk");
        self.snaps[i].taken = true;
        for &d in &devices {
            let chunk = self.expected_chunk_size(d);
            let m = &mut self.model[d];
            m.switch();
            m.image = Some(m.origin.clone());
            m.chunk = chunk;
            m.copied.clear();
            m.corrupted = None;
            let image = self.engine.image(&name(d)).unwrap();
            assert_eq!(image.chunk_size(), chunk);
        }
        true
    }

    fn destroy(&mut self, i: usize) {
        let snap = self.snaps.remove(i);
        let image = snap
            .taken
            .then(|| self.engine.image(&name(snap.devices[0])).unwrap());
        self.engine.snapshot_destroy(&snap.id).unwrap();
        for &d in &snap.devices {
            let m = &mut self.model[d];
            m.snapshot = None;
            m.image = None;
            m.copied.clear();
            m.corrupted = None;
            assert_eq!(self.engine.snapshot_of(&name(d)).unwrap(), None);
        }
        if let Some(image) = image {
            let mut buf = [0u8; 1];
            assert!(matches!(image.read(&mut buf, 0), Err(Error::NotFound(_))));
        }
        // The last reference is gone: a storage file is shrunk back.
        if let Some((path, len)) = snap.file {
            assert_eq!(std::fs::metadata(&path).unwrap().len(), len, "storage file");
        }
    }

    /// Appends one or two ranges of a fresh device; a range smaller than
    /// the snapshot's chunk is refused (EINVAL) and nothing is added.
    fn append(&mut self, i: usize, size: u8, extra: u16, two: bool) {
        let min = self.min_range(&self.snaps[i].devices);
        let len = match size {
            0 => min - 512,
            1 => min,
            2 => min + 512 * (extra as u64 % (2 * min / 512)),
            3 => 2 * min + 512 * (extra as u64 % 7),
            _ => STEP + 512 * (extra as u64 % 64),
        };
        let count = if two { 2 } else { 1 };
        let backing = Arc::new(MemDevice::new(8 * 512 + count * len + 300));
        let ranges: Vec<SectorRange> = (0..count)
            .map(|k| SectorRange::new(8 + k * len / 512, len / 512))
            .collect();
        let device: Arc<dyn BlockDevice> = backing.clone();
        let result = self
            .engine
            .snapshot_append_storage_device(&self.snaps[i].id, device, &ranges);
        if len < min {
            match result {
                Err(e) => assert_eq!(e.errno(), EINVAL, "short range: {e}"),
                Ok(()) => panic!("a range of {len} bytes under a chunk of {min} was appended"),
            }
            return;
        }
        result.expect("append of ranges of at least a chunk");
        // Overlapping storage already given is refused.
        let device: Arc<dyn BlockDevice> = backing.clone();
        let overlap = self.engine.snapshot_append_storage_device(
            &self.snaps[i].id,
            device,
            &[SectorRange::new(8 + len / 512 - 1, min / 512)],
        );
        assert!(
            matches!(overlap, Err(Error::InvalidArgument(_))),
            "{overlap:?}"
        );
        let storage = &mut self.snaps[i].storage;
        backing.set_fail_writes(storage.faulted);
        storage.devices.push(backing);
        for _ in 0..count {
            storage.push(len, true);
        }
    }

    fn reattach(&mut self, dev: usize) {
        let handle = self.engine.device(&name(dev)).unwrap();
        let result = self.engine.detach(&name(dev));
        if self.model[dev].snapshot.is_some() {
            assert!(matches!(result, Err(Error::Busy { .. })), "{result:?}");
            return;
        }
        result.unwrap();
        let gone = self.engine.device(&name(dev));
        assert!(matches!(gone, Err(Error::NotFound(_))), "{gone:?}");
        // A handle from before the detach writes nothing.
        let stale = handle.write(&[1], 0);
        assert!(matches!(stale, Err(Error::NotFound(_))), "{stale:?}");
        self.engine
            .attach(&name(dev), self.origins[dev].clone())
            .unwrap();
        self.model[dev].reattach();
    }

    fn cycle(&mut self, mask: u8, count: u8) {
        let chosen: Vec<usize> = (0..self.model.len())
            .filter(|&d| mask & (1 << d) != 0 && self.model[d].snapshot.is_none())
            .collect();
        if chosen.is_empty() {
            return;
        }
        let storage = Arc::new(MemDevice::new(STEP));
        for _ in 0..count {
            let id = self
                .engine
                .snapshot_create(
                    StorageSpec::Device(storage.clone()),
                    SnapshotOptions::default(),
                )
                .unwrap();
            for &d in &chosen {
                self.engine.snapshot_add(&id, &name(d)).unwrap();
            }
            self.engine.snapshot_take(&id).unwrap();
            for &d in &chosen {
                self.model[d].switch();
                self.check_cbt(d);
            }
            self.engine.snapshot_destroy(&id).unwrap();
        }
    }

    /// An origin write (or discard, write-zeroes) of `data` at `offset` and
    /// what the engine answered: the copies it needed, their failures and
    /// what the policy makes of them, the change map, the origin.
    fn origin_write(&mut self, dev: usize, offset: u64, data: &[u8], result: Result<(), Error>) {
        let len = data.len() as u64;
        if len == 0 {
            assert!(result.is_ok(), "zero-length write: {result:?}");
            return;
        }
        let m = &mut self.model[dev];
        let mut refused = None;
        let snap = m
            .snapshot
            .and_then(|id| self.snaps.iter_mut().find(|s| s.id == id))
            .filter(|s| s.taken);
        if let Some(snap) = snap {
            if m.corrupted.is_none() {
                for chunk in m.chunks(offset, len) {
                    if m.copied.contains_key(&chunk) {
                        continue;
                    }
                    if let Err(errno) = copy(m, &mut snap.storage, chunk) {
                        if snap.break_writes {
                            refused = Some(errno);
                        } else {
                            m.corrupted = Some(errno);
                        }
                        break;
                    }
                }
            }
        }
        let what = format!("origin write dev{dev} {offset}+{len}");
        if let Some(errno) = refused {
            // Refused before it was marked or done.
            assert_outcome(Expect::Errno(errno), result, &what);
            return;
        }
        m.mark(offset, len);
        if m.fail_writes {
            assert_outcome(Expect::Errno(EIO), result, &what);
        } else {
            assert_outcome(Expect::Ok, result, &what);
            m.origin[offset as usize..(offset + len) as usize].copy_from_slice(data);
        }
    }

    /// An image write, chunk by chunk in order: the copy if the chunk has
    /// none, then the data into the chunk's slot; the first failure ends
    /// it, what was written before stays.
    fn image_write(&mut self, dev: usize, offset: u64, data: &[u8]) -> Expect {
        let len = data.len() as u64;
        let m = &mut self.model[dev];
        if let Some(errno) = m.corrupted {
            return Expect::Corrupted(errno);
        }
        if len == 0 {
            return Expect::Ok;
        }
        m.mark_live_and_readable(offset, len);
        let id = m.snapshot.unwrap();
        let snap = self.snaps.iter_mut().find(|s| s.id == id).unwrap();
        for chunk in m.chunks(offset, len) {
            let slot = match m.copied.get(&chunk) {
                Some(&slot) => slot,
                None => match copy(m, &mut snap.storage, chunk) {
                    Ok(slot) => slot,
                    Err(errno) => return Expect::Errno(errno),
                },
            };
            if snap.storage.write_fails(slot) {
                return Expect::Errno(EIO);
            }
            let start = (chunk * m.chunk).max(offset);
            let end = ((chunk + 1) * m.chunk).min(offset + len);
            m.image.as_mut().unwrap()[start as usize..end as usize]
                .copy_from_slice(&data[(start - offset) as usize..(end - offset) as usize]);
        }
        Expect::Ok
    }

    fn check_image_range(&self, dev: usize, offset: u64, len: u64) {
        let m = &self.model[dev];
        let Some(content) = &m.image else {
            return;
        };
        let image = self.engine.image(&name(dev)).unwrap();
        assert_eq!(
            image.error_code(),
            m.corrupted.unwrap_or(0),
            "error code of dev{dev}"
        );
        let mut buf = vec![0u8; len as usize];
        let result = image.read(&mut buf, offset);
        let what = format!("image read dev{dev} {offset}+{len}");
        if let Some(errno) = m.corrupted {
            assert_outcome(Expect::Corrupted(errno), result, &what);
            return;
        }
        let uncopied = len > 0 && m.chunks(offset, len).any(|c| !m.copied.contains_key(&c));
        if m.fail_reads && uncopied {
            assert_outcome(Expect::Errno(EIO), result, &what);
            assert_eq!(image.error_code(), 0, "a failed read corrupts nothing");
            return;
        }
        assert_outcome(Expect::Ok, result, &what);
        assert!(
            buf == content[offset as usize..(offset + len) as usize],
            "image of dev{dev} differs at {offset}+{len}"
        );
    }

    fn check_cbt(&mut self, d: usize) {
        let m = &self.model[d];
        let info = self.engine.cbt_info(&name(d)).unwrap();
        assert_eq!(info.block_size, 1 << m.block_shift);
        assert_eq!(info.block_count, m.live.len() as u64);
        assert_eq!(
            (info.changes_number, info.current_number),
            (m.previous, m.current),
            "change numbers of dev{d}"
        );
        assert_eq!(
            self.engine.read_cbt_map(&name(d)).unwrap(),
            m.readable,
            "readable map of dev{d}"
        );
        let (seen, id) = self.generations[d];
        if m.generation == seen {
            assert_eq!(info.generation_id, id, "generation of dev{d} changed");
        } else {
            assert_ne!(info.generation_id, id, "generation of dev{d} kept");
        }
        self.generations[d] = (m.generation, info.generation_id);
    }

    fn check(&mut self) {
        // Growth runs in the background, ahead of need: the model grows at
        // once, so compare with the engine's storage once growth settled.
        for s in &self.snaps {
            self.engine.snapshot_wait_storage_growth(&s.id).unwrap();
        }
        for d in 0..self.model.len() {
            let m = &self.model[d];
            let device = self.engine.device(&name(d)).unwrap();
            let mut buf = vec![0u8; m.origin.len()];
            if m.fail_reads {
                assert!(device.read(&mut buf, 0).is_err(), "failing origin read");
                buf = self.origins[d].contents();
            } else {
                device.read(&mut buf, 0).unwrap();
            }
            assert!(buf == m.origin, "origin of dev{d} differs from the model");
            assert_eq!(self.engine.snapshot_of(&name(d)).unwrap(), m.snapshot);
            self.check_image_range(d, 0, m.origin.len() as u64);
            self.check_cbt(d);
        }
        for s in &self.snaps {
            let info = self.engine.snapshot_info(&s.id).unwrap();
            let st = &s.storage;
            assert_eq!(
                (info.storage.total, info.storage.used, info.storage.extents),
                (st.total, st.used, st.extents.len()),
                "storage (total, used, extents) of snapshot {}",
                s.id
            );
            assert_eq!(info.taken, s.taken);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn engine_matches_model(setup in setup(), ops in prop::collection::vec(op(), 1..100)) {
        let mut h = Harness::new(setup);
        for op in &ops {
            h.run(op);
            h.check();
        }
        // Destroy everything: origins are intact, tracking goes on.
        while !h.snaps.is_empty() {
            h.destroy(0);
        }
        h.check();
    }
}
