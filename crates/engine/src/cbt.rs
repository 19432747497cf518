//! Change-block tracking of one device ([`ChangeTracker`]).
//!
//! Owns the live map (one byte per tracking block, raised to the current
//! change number by every write-type request), the readable map (a copy of the
//! live map made at each snapshot take, frozen in between), the generation
//! UUID and the change numbers. Rules: DESIGN.md §2 "Change tracking".
//!
//! Persistence is the daemon's; the tracker offers what it needs: its whole
//! state as a [`CbtState`] (and a tracker rebuilt from one), the reason its
//! generation began ([`GenerationReason`]), and a [`ChangeJournal`] hook
//! told of every first write to a block under the current number, of image
//! writes and of switches, before the write reaches the origin.
//!
//! Invariants: `1 <= current <= 255`; `previous < current` except right after
//! a wrap, where both restart as at attach (previous 0, current 1) with zeroed
//! maps and a new generation. Callers ([`crate::TrackedDevice`]) hold the
//! device's write gate shared while marking and exclusively around
//! [`ChangeTracker::switch`], so no write straddles a change-number switch.

use std::fmt;
use std::sync::Arc;

use crate::sync::atomic::{AtomicU8, Ordering};
use crate::sync::Mutex;

use uuid::Uuid;

use crate::config::Config;

#[derive(Debug)]
pub struct ChangeTracker {
    capacity: u64,
    block_shift: u32,
    live: Box<[AtomicU8]>,
    current: AtomicU8,
    frozen: Mutex<FrozenState>,
    /// Never changed after construction.
    journal: Option<Arc<dyn ChangeJournal>>,
}

#[derive(Debug)]
struct FrozenState {
    readable: Vec<u8>,
    previous: u8,
    generation: Uuid,
    /// Why the generation began (never `Restored`).
    began: GenerationReason,
    /// Whether it was restored from a saved state since.
    restored: bool,
}

/// Why the current generation began: what a backup consumer reads to choose
/// between an incremental and a full backup (`generation_reason=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GenerationReason {
    /// A device attached for the first time.
    Attached,
    /// A clean restart: the maps and generation were restored.
    Restored,
    /// The daemon stopped without saving the maps (crash, kill, power loss).
    UncleanStop,
    /// The device was modified while no daemon tracked it.
    ChangedWhileDetached,
    /// Nothing about the device allows checking that it is unchanged.
    Unverifiable,
    /// The change number wrapped past 255 at a take.
    Wrap,
    /// The saved state was unreadable, corrupt or inconsistent.
    RecordCorrupt,
}

impl GenerationReason {
    pub const ALL: [GenerationReason; 7] = [
        Self::Attached,
        Self::Restored,
        Self::UncleanStop,
        Self::ChangedWhileDetached,
        Self::Unverifiable,
        Self::Wrap,
        Self::RecordCorrupt,
    ];

    /// The name on the wire and in `cbtinfo`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Attached => "attached",
            Self::Restored => "restored",
            Self::UncleanStop => "unclean-stop",
            Self::ChangedWhileDetached => "changed-while-detached",
            Self::Unverifiable => "unverifiable",
            Self::Wrap => "wrap",
            Self::RecordCorrupt => "record-corrupt",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == name)
    }
}

impl fmt::Display for GenerationReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The whole state of a tracker, as saved at a clean stop and restored at
/// the next attach of the same device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CbtState {
    pub block_size: u32,
    pub capacity: u64,
    pub generation: Uuid,
    /// Why the generation began (never `Restored`): kept so that its first
    /// take still tells the watcher after a restart.
    pub began: GenerationReason,
    pub previous: u8,
    pub current: u8,
    pub live: Vec<u8>,
    pub readable: Vec<u8>,
}

/// One change to a tracker's state, as a [`ChangeJournal`] records it and
/// [`CbtState::apply`] replays it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Live blocks `first..=last` raised to `number` (the current one).
    Mark { first: u64, last: u64, number: u8 },
    /// Readable blocks `first..=last` raised to at least `number` (an image
    /// write or a mark-dirty; `number` is the readable map's change number).
    ReadableMark { first: u64, last: u64, number: u8 },
    /// A take: the readable map becomes the live map and the numbers move
    /// on, or everything restarts (wrap) in `generation`.
    Switch { generation: Uuid },
}

impl CbtState {
    /// Replays one journalled change, exactly as the tracker made it.
    /// Refused when it cannot belong to this state.
    pub fn apply(&mut self, change: &Change) -> std::result::Result<(), String> {
        let count = self.live.len() as u64;
        let range = |first: u64, last: u64| {
            if first <= last && last < count {
                Ok(first as usize..=last as usize)
            } else {
                Err(format!(
                    "blocks {first}..={last} outside the {count} blocks"
                ))
            }
        };
        match *change {
            Change::Mark {
                first,
                last,
                number,
            } => {
                if number != self.current {
                    return Err(format!(
                        "a mark with number {number} while the current one is {}",
                        self.current
                    ));
                }
                self.live[range(first, last)?].fill(number);
            }
            Change::ReadableMark {
                first,
                last,
                number,
            } => {
                if number != self.previous {
                    return Err(format!(
                        "an image mark with number {number} while the readable one is {}",
                        self.previous
                    ));
                }
                for b in &mut self.readable[range(first, last)?] {
                    *b = (*b).max(number);
                }
            }
            Change::Switch { generation } => {
                if self.current == u8::MAX {
                    self.live.fill(0);
                    self.readable.fill(0);
                    self.previous = 0;
                    self.current = 1;
                    self.began = GenerationReason::Wrap;
                } else {
                    if generation != self.generation {
                        return Err(format!(
                            "a switch into generation {generation} without a wrap"
                        ));
                    }
                    self.readable.copy_from_slice(&self.live);
                    self.previous = self.current;
                    self.current += 1;
                }
                self.generation = generation;
            }
        }
        Ok(())
    }
}

/// Told of every change to the tracker's state before it is visible, in the
/// order the changes happen, so that it can keep a durable copy (the
/// daemon's write-ahead journal, or its "dirty" flag). Calls for one device
/// come under its write gate: marks shared, switches exclusive, so a switch
/// is never reordered with a mark.
pub trait ChangeJournal: Send + Sync + fmt::Debug {
    /// Records a change; returns a ticket for [`ChangeJournal::wait`].
    fn record(&self, change: Change) -> u64;
    /// Returns once the change of `ticket` (`None`: every change recorded
    /// so far) is as durable as this journal promises. Called before every
    /// write-type request reaches the origin, and at every take. A journal
    /// that cannot keep its promise must make its copy invalid, never fail
    /// the write: origin data comes first.
    fn wait(&self, ticket: Option<u64>);
}

/// What `cbtinfo` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CbtInfo {
    pub block_size: u32,
    pub device_capacity: u64,
    pub block_count: u64,
    pub generation_id: Uuid,
    /// The change number of the readable map: a block changed since backup N
    /// iff its byte is greater than N (same generation and block size).
    pub changes_number: u8,
    /// The change number that writes are marked with now.
    pub current_number: u8,
    /// Why the tracking goes on in this generation now: why it began, or
    /// `Restored` when it was restored from a saved state since.
    pub generation_reason: GenerationReason,
    /// Why the generation began, restored or not (never `Restored`).
    pub generation_began: GenerationReason,
}

impl ChangeTracker {
    /// The state at attach (previous 0, current 1, zeroed maps), in a new
    /// generation begun for `reason`.
    pub(crate) fn new(capacity: u64, config: &Config, reason: GenerationReason) -> Self {
        let block_shift = config.tracking_block_shift(capacity);
        let count = capacity.div_ceil(1 << block_shift) as usize;
        Self {
            capacity,
            block_shift,
            live: (0..count).map(|_| AtomicU8::new(0)).collect(),
            current: AtomicU8::new(1),
            frozen: Mutex::new(FrozenState {
                readable: vec![0; count],
                previous: 0,
                generation: Uuid::new_v4(),
                began: reason,
                restored: false,
            }),
            journal: None,
        }
    }

    /// A tracker that goes on from a saved state. Refused (with what is
    /// wrong) when the state does not fit this device and configuration or
    /// breaks the tracker's invariants: a restored map is never a guess.
    pub(crate) fn restore(
        capacity: u64,
        config: &Config,
        state: CbtState,
    ) -> std::result::Result<Self, String> {
        let block_shift = config.tracking_block_shift(capacity);
        let count = capacity.div_ceil(1 << block_shift) as usize;
        if state.capacity != capacity {
            return Err(format!(
                "saved for {} bytes, the device has {capacity}",
                state.capacity
            ));
        }
        if state.block_size != 1 << block_shift {
            return Err(format!(
                "saved with blocks of {} bytes, the configuration gives {}",
                state.block_size,
                1u64 << block_shift
            ));
        }
        if state.live.len() != count || state.readable.len() != count {
            return Err(format!(
                "maps of {} and {} blocks, the device has {count}",
                state.live.len(),
                state.readable.len()
            ));
        }
        if state.began == GenerationReason::Restored {
            return Err(
                "the generation's reason is 'restored', which no generation begins with".into(),
            );
        }
        let numbers_ok = state.current >= 1
            && (state.previous < state.current || (state.previous, state.current) == (0, 1));
        if !numbers_ok {
            return Err(format!(
                "change numbers previous {} and current {} are inconsistent",
                state.previous, state.current
            ));
        }
        if let Some(b) = state.live.iter().position(|&n| n > state.current) {
            return Err(format!(
                "block {b} holds change number {} above the current {}",
                state.live[b], state.current
            ));
        }
        if let Some(b) = state.readable.iter().position(|&n| n > state.previous) {
            return Err(format!(
                "readable block {b} holds change number {} above the readable {}",
                state.readable[b], state.previous
            ));
        }
        Ok(Self {
            capacity,
            block_shift,
            live: state.live.into_iter().map(AtomicU8::new).collect(),
            current: AtomicU8::new(state.current),
            frozen: Mutex::new(FrozenState {
                readable: state.readable,
                previous: state.previous,
                generation: state.generation,
                began: state.began,
                restored: true,
            }),
            journal: None,
        })
    }

    /// Tells `journal` of every change from now on. Set before the device
    /// serves any write.
    pub(crate) fn with_journal(mut self, journal: Option<Arc<dyn ChangeJournal>>) -> Self {
        self.journal = journal;
        self
    }

    /// The whole state. Consistent when the device's writes are held (see
    /// [`crate::Engine::cbt_state`]); otherwise marks may race the copy.
    pub fn state(&self) -> CbtState {
        let frozen = self.frozen.lock().unwrap();
        CbtState {
            block_size: self.block_size(),
            capacity: self.capacity,
            generation: frozen.generation,
            began: frozen.began,
            previous: frozen.previous,
            current: self.current.load(Ordering::Relaxed),
            live: self
                .live
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            readable: frozen.readable.clone(),
        }
    }

    pub fn block_size(&self) -> u32 {
        1 << self.block_shift
    }

    pub fn block_count(&self) -> u64 {
        self.live.len() as u64
    }

    /// Marks every block that `[offset, offset+len)` touches as changed in the
    /// current change number. A zero-length request changes nothing.
    pub(crate) fn mark(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.capacity {
            return;
        }
        let end = (offset + len).min(self.capacity);
        let first = (offset >> self.block_shift) as usize;
        let last = ((end - 1) >> self.block_shift) as usize;
        let current = self.current.load(Ordering::Relaxed);
        let blocks = &self.live[first..=last];
        let Some(journal) = &self.journal else {
            for byte in blocks {
                // Skip the store when already marked: keeps the cache line
                // clean on the hot path of repeated writes to the same block.
                if byte.load(Ordering::Relaxed) != current {
                    byte.store(current, Ordering::Relaxed);
                }
            }
            return;
        };
        // The journal hears of a mark before any byte shows it: a writer
        // that finds a byte already raised (Acquire) then waits for every
        // mark made so far, that one included, so it is never acknowledged
        // before the mark it relies on is durable.
        let ticket = if blocks.iter().any(|b| b.load(Ordering::Acquire) != current) {
            let ticket = journal.record(Change::Mark {
                first: first as u64,
                last: last as u64,
                number: current,
            });
            for byte in blocks {
                byte.store(current, Ordering::Release);
            }
            Some(ticket)
        } else {
            None
        };
        journal.wait(ticket);
    }

    /// An image write or a mark-dirty: the live map as any write, and the
    /// readable map of the last take raised to its change number
    /// (`previous`), so the consumer of that snapshot sees the blocks its
    /// image changed and the ranges marked dirty while it is held.
    pub(crate) fn mark_live_and_readable(&self, offset: u64, len: u64) {
        self.mark(offset, len);
        if len == 0 || offset >= self.capacity {
            return;
        }
        let end = (offset + len).min(self.capacity);
        let first = (offset >> self.block_shift) as usize;
        let last = ((end - 1) >> self.block_shift) as usize;
        let mut frozen = self.frozen.lock().unwrap();
        let number = frozen.previous;
        for byte in &mut frozen.readable[first..=last] {
            *byte = (*byte).max(number);
        }
        if let Some(journal) = &self.journal {
            let ticket = journal.record(Change::ReadableMark {
                first: first as u64,
                last: last as u64,
                number,
            });
            drop(frozen);
            journal.wait(Some(ticket));
        }
    }

    /// The snapshot-take switch: the readable map becomes the live map,
    /// previous = current, current += 1; at 256 everything restarts as at
    /// attach with a new generation.
    pub(crate) fn switch(&self) {
        let mut frozen = self.frozen.lock().unwrap();
        let current = self.current.load(Ordering::Relaxed);
        if current == u8::MAX {
            for byte in self.live.iter() {
                byte.store(0, Ordering::Relaxed);
            }
            frozen.readable.fill(0);
            frozen.previous = 0;
            frozen.generation = Uuid::new_v4();
            frozen.began = GenerationReason::Wrap;
            frozen.restored = false;
            self.current.store(1, Ordering::Relaxed);
        } else {
            for (dst, src) in frozen.readable.iter_mut().zip(self.live.iter()) {
                *dst = src.load(Ordering::Relaxed);
            }
            frozen.previous = current;
            self.current.store(current + 1, Ordering::Relaxed);
        }
        if let Some(journal) = &self.journal {
            // A take is acknowledged only once its switch is durable: a
            // consumer that backed up change number N must find the writes
            // after it above N after any crash.
            let ticket = journal.record(Change::Switch {
                generation: frozen.generation,
            });
            drop(frozen);
            journal.wait(Some(ticket));
        }
    }

    /// A copy of the readable map (what `readcbtmap` returns).
    pub fn readable_map(&self) -> Vec<u8> {
        self.frozen.lock().unwrap().readable.clone()
    }

    pub fn info(&self) -> CbtInfo {
        let frozen = self.frozen.lock().unwrap();
        CbtInfo {
            block_size: self.block_size(),
            device_capacity: self.capacity,
            block_count: self.block_count(),
            generation_id: frozen.generation,
            changes_number: frozen.previous,
            current_number: self.current.load(Ordering::Relaxed),
            generation_reason: if frozen.restored {
                GenerationReason::Restored
            } else {
                frozen.began
            },
            generation_began: frozen.began,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> ChangeTracker {
        let config = Config {
            tracking_block_minimum_shift: 12,
            ..Config::default()
        };
        ChangeTracker::new(10 * 4096 + 512, &config, GenerationReason::Attached)
    }

    #[test]
    fn attach_state() {
        let t = small();
        let info = t.info();
        assert_eq!(info.block_count, 11);
        assert_eq!(info.changes_number, 0);
        assert_eq!(info.current_number, 1);
        assert!(t.readable_map().iter().all(|&b| b == 0));
    }

    #[test]
    fn marks_each_touched_block_once_switched() {
        let t = small();
        t.mark(4095, 2);
        t.mark(10 * 4096, 512);
        t.mark(5 * 4096, 0);
        assert!(t.readable_map().iter().all(|&b| b == 0));
        t.switch();
        let map = t.readable_map();
        assert_eq!(map, vec![1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(t.info().changes_number, 1);
        t.mark(0, 1);
        t.switch();
        assert_eq!(t.readable_map()[..2], [2, 1]);
    }

    #[test]
    fn wrap_restarts_generation() {
        let t = small();
        let first = t.info().generation_id;
        for _ in 1..254 {
            t.switch();
        }
        t.mark(0, 1);
        assert_eq!(t.info().current_number, 254);
        t.switch();
        assert_eq!(t.readable_map()[0], 254);
        assert_eq!(t.info().generation_id, first);
        t.mark(4096, 1);
        t.switch(); // current would reach 256: restart
        let info = t.info();
        assert_ne!(info.generation_id, first);
        assert_eq!((info.changes_number, info.current_number), (0, 1));
        assert!(t.readable_map().iter().all(|&b| b == 0));
        t.mark(0, 1);
        t.switch();
        assert_eq!(t.readable_map()[..2], [1, 0]);
    }

    /// Keeps every change it is told of, as the daemon's journal does.
    #[derive(Debug, Default)]
    struct Recorder {
        changes: std::sync::Mutex<Vec<Change>>,
        waits: std::sync::atomic::AtomicUsize,
    }

    impl ChangeJournal for Recorder {
        fn record(&self, change: Change) -> u64 {
            let mut changes = self.changes.lock().unwrap();
            changes.push(change);
            changes.len() as u64
        }
        fn wait(&self, _ticket: Option<u64>) {
            self.waits.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    fn tracker_with(recorder: &Arc<Recorder>) -> ChangeTracker {
        small().with_journal(Some(recorder.clone() as Arc<dyn ChangeJournal>))
    }

    #[test]
    fn restore_refuses_states_that_do_not_fit() {
        let config = Config {
            tracking_block_minimum_shift: 12,
            ..Config::default()
        };
        let size = 10 * 4096 + 512;
        let good = small().state();
        let restored = ChangeTracker::restore(size, &config, good.clone()).unwrap();
        assert_eq!(restored.state(), good);
        assert_eq!(
            restored.info().generation_reason,
            GenerationReason::Restored
        );
        let bad = |f: &dyn Fn(&mut CbtState)| {
            let mut s = good.clone();
            f(&mut s);
            ChangeTracker::restore(size, &config, s).unwrap_err()
        };
        assert!(bad(&|s| s.capacity += 512).contains("bytes"));
        assert!(bad(&|s| s.block_size *= 2).contains("blocks of"));
        assert!(bad(&|s| s.live.pop().map_or((), drop)).contains("maps of"));
        assert!(bad(&|s| s.current = 0).contains("inconsistent"));
        assert!(bad(&|s| s.live[3] = 2).contains("block 3"));
        assert!(bad(&|s| s.readable[4] = 1).contains("readable block 4"));
    }

    proptest::proptest! {
        /// Replaying what the journal was told, from the state the journal
        /// started with, gives the tracker's state exactly, whatever the
        /// writes, image writes and takes (through the wrap); and repeated
        /// writes to marked blocks record nothing.
        #[test]
        fn the_journal_replays_to_the_trackers_state(
            ops in proptest::collection::vec((0u8..10, 0u64..11 * 4096, 1u64..3 * 4096), 1..400),
            skip in 0u32..260,
        ) {
            let recorder = Arc::new(Recorder::default());
            let t = small();
            for _ in 0..skip {
                t.switch();
            }
            let t = t.with_journal(Some(recorder.clone() as Arc<dyn ChangeJournal>));
            let mut replayed = t.state();
            for (kind, offset, len) in ops {
                match kind {
                    0 => t.switch(),
                    1 => t.mark_live_and_readable(offset, len),
                    _ => {
                        let before = recorder.changes.lock().unwrap().len();
                        // Blocks of 4 KiB (small()): a record iff one is below current.
                        let (current, live) = (t.info().current_number, t.state().live);
                        let end = (offset + len).min(10 * 4096 + 512);
                        let fresh = offset < end
                            && live[(offset >> 12) as usize..=((end - 1) >> 12) as usize]
                                .iter()
                                .any(|&b| b != current);
                        t.mark(offset, len);
                        let after = recorder.changes.lock().unwrap().len();
                        proptest::prop_assert_eq!(after - before, usize::from(fresh));
                    }
                }
            }
            for change in recorder.changes.lock().unwrap().iter() {
                replayed.apply(change).unwrap();
            }
            proptest::prop_assert_eq!(replayed, t.state());
        }
    }

    #[test]
    fn every_write_waits_for_the_journal_and_a_wrap_is_journalled() {
        let recorder = Arc::new(Recorder::default());
        let t = tracker_with(&recorder);
        t.mark(0, 1);
        t.mark(0, 1);
        assert_eq!(recorder.changes.lock().unwrap().len(), 1);
        assert_eq!(recorder.waits.load(std::sync::atomic::Ordering::SeqCst), 2);
        for _ in 0..255 {
            t.switch();
        }
        let info = t.info();
        assert_eq!(info.generation_reason, GenerationReason::Wrap);
        let changes = recorder.changes.lock().unwrap();
        assert_eq!(
            changes.last(),
            Some(&Change::Switch {
                generation: info.generation_id
            })
        );
    }
}
