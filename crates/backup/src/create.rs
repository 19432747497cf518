//! Backing up one device image into the repository: what to read (all of
//! it, or in an incremental only the blocks changed since the last backup,
//! as patches over the previous backup's regions), holes skipped through
//! the image's allocation, every chunk hashed and stored once.
//!
//! Invariants: whatever of a region is not read comes from the previous
//! backup's entry for it, which is only done where the change map proves
//! it unchanged (same generation and block size, every block not read at
//! or below the previous backup's change number). A chunk is named in a
//! manifest only after it is stored ([`Repository`]). A device's chunk
//! list stays within [`INDEX_BYTES_PER_REGION`] per region.
//!
//! Callers: `main` (the `create` command), with an [`ImageSource`] per
//! reader thread (an NBD connection to the snapshot image).

use std::collections::BTreeSet;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use serde::Serialize;
use uuid::Uuid;

use crate::repo::{
    chunk_id, ChunkId, DeviceBackup, Patch, Region, Repository, Result, INDEX_BYTES_PER_REGION,
};

/// The chunk size of a device's backup: 4 MiB (an index of 64 bytes per
/// 4 MiB: 16 MiB of manifest per TiB), or the tracking block if larger,
/// so that every chunk is whole tracking blocks.
pub fn chunk_size(block_size: u32) -> u64 {
    (4u64 << 20).max(u64::from(block_size))
}

/// Read access to a snapshot image.
pub trait ImageSource: Send {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// The extents of `[offset, offset+len)` as (length, reads as zeroes).
    fn zero_extents(&mut self, offset: u64, len: u64) -> io::Result<Vec<(u64, bool)>>;
}

/// What the daemon says of the device at the take.
#[derive(Debug, Clone)]
pub struct Tracking {
    pub size: u64,
    pub block_size: u32,
    pub generation_id: Uuid,
    pub changes_number: u8,
    pub generation_reason: String,
}

/// Full or incremental, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub incremental: bool,
    pub reason: String,
}

/// Incremental only when the change map can prove what did not change.
pub fn plan(previous: Option<&DeviceBackup>, now: &Tracking) -> Plan {
    let full = |reason: String| Plan {
        incremental: false,
        reason,
    };
    let Some(p) = previous else {
        return full("no earlier backup of this device in the repository".into());
    };
    if p.generation_id != now.generation_id {
        return full(format!(
            "new change-tracking generation {} (generation_reason={}); the last backup had {}",
            now.generation_id, now.generation_reason, p.generation_id
        ));
    }
    if p.block_size != now.block_size || p.size != now.size {
        return full(format!(
            "the device changed from {} bytes in blocks of {} to {} in blocks of {}",
            p.size, p.block_size, now.size, now.block_size
        ));
    }
    if p.chunk_size != chunk_size(now.block_size) || p.changes_number >= now.changes_number {
        return full(format!(
            "the last backup (change number {}, chunks of {}) cannot be followed",
            p.changes_number, p.chunk_size
        ));
    }
    Plan {
        incremental: true,
        reason: format!(
            "blocks changed since change number {} of generation {}",
            p.changes_number, p.generation_id
        ),
    }
}

/// Figures of one device's backup.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Stats {
    pub bytes_read: u64,
    /// Plain bytes of chunks new to the repository.
    pub bytes_new: u64,
    /// Bytes those took on disk (compressed).
    pub bytes_stored: u64,
    /// Chunks read that the repository already had.
    pub chunks_deduplicated: u64,
    /// Regions taken from the previous backup without reading.
    pub chunks_reused: u64,
    pub chunks_zero: u64,
    /// Regions of which only the changed blocks were read, as patches.
    pub regions_patched: u64,
}

/// Reports progress: bytes done so far of the bytes this backup must look
/// at (the chunks it does not take from the previous backup).
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Sync);

/// A region with more patches than this is read whole.
const MAX_PATCHES: usize = 16;

/// What a backup does with one region.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RegionPlan {
    /// The previous backup's entry: the change map proves it unchanged.
    Reuse,
    /// Read and stored whole.
    Read,
    /// The previous entry with the changed blocks laid over it: `kept`
    /// are its patches still visible, `runs` the changed block runs
    /// (first, count) to read, each becoming a patch after them.
    Patch {
        base: Option<ChunkId>,
        kept: Vec<Patch>,
        runs: Vec<(u32, u32)>,
    },
}

/// The manifest entry a plan gives, with `new` ids for its reads (a
/// placeholder id when estimating its size).
fn planned_region(
    plan: &RegionPlan,
    previous: Option<&Region>,
    mut new: impl FnMut(usize) -> Option<ChunkId>,
) -> Region {
    match plan {
        RegionPlan::Reuse => previous.expect("reuse needs a previous entry").clone(),
        RegionPlan::Read => Region::Whole(new(0)),
        RegionPlan::Patch { base, kept, runs } => {
            let mut patches = kept.clone();
            patches.extend(
                runs.iter()
                    .enumerate()
                    .map(|(k, &(first, count))| Patch(first, count, new(k))),
            );
            Region::Patched {
                base: base.clone(),
                patches,
            }
        }
    }
}

/// Decides per region: everything read in a full backup; in an
/// incremental, unchanged regions reused, changed ones patched with their
/// changed blocks, or read whole when more than half of them changed, when
/// they would hold more than [`MAX_PATCHES`], or when the chunk list would
/// outgrow [`INDEX_BYTES_PER_REGION`] (the most patched go first).
fn plan_regions(
    now: &Tracking,
    previous: Option<&DeviceBackup>,
    map: Option<&[u8]>,
    count: usize,
) -> Vec<RegionPlan> {
    let (Some(p), Some(map)) = (previous, map) else {
        return vec![RegionPlan::Read; count];
    };
    let bpc = (chunk_size(now.block_size) / u64::from(now.block_size)) as usize;
    let mut plans: Vec<RegionPlan> = (0..count)
        .map(|c| {
            let blocks = &map[(c * bpc).min(map.len())..((c + 1) * bpc).min(map.len())];
            let changed = |b: usize| blocks[b] > p.changes_number;
            let n = (0..blocks.len()).filter(|&b| changed(b)).count();
            if n == 0 {
                return RegionPlan::Reuse;
            }
            if 2 * n > bpc {
                return RegionPlan::Read;
            }
            let mut runs: Vec<(u32, u32)> = Vec::new();
            for b in (0..blocks.len()).filter(|&b| changed(b)) {
                match runs.last_mut() {
                    Some((first, count)) if (*first + *count) as usize == b => *count += 1,
                    _ => runs.push((b as u32, 1)),
                }
            }
            let (base, old) = match &p.chunks[c] {
                Region::Whole(base) => (base.clone(), Vec::new()),
                Region::Patched { base, patches } => (base.clone(), patches.clone()),
            };
            // An old patch wholly under the new runs can no longer be seen.
            let covered = |q: &Patch| {
                runs.iter()
                    .any(|&(first, count)| first <= q.0 && q.0 + q.1 <= first + count)
            };
            let kept: Vec<Patch> = old.into_iter().filter(|q| !covered(q)).collect();
            if kept.len() + runs.len() > MAX_PATCHES {
                return RegionPlan::Read;
            }
            RegionPlan::Patch { base, kept, runs }
        })
        .collect();
    // Keep the chunk list within its budget: read the regions with the
    // most patches (changed now or not) whole until it fits.
    let placeholder = || Some("0".repeat(64));
    let bytes = |plans: &[RegionPlan], c: usize| {
        planned_region(&plans[c], p.chunks.get(c), |_| placeholder()).index_bytes()
    };
    let mut total: usize = (0..count).map(|c| bytes(&plans, c)).sum();
    let budget = count * INDEX_BYTES_PER_REGION;
    if total > budget {
        let mut patched: Vec<(usize, usize)> = (0..count)
            .map(|c| {
                let r = planned_region(&plans[c], p.chunks.get(c), |_| placeholder());
                (r.patch_count(), c)
            })
            .filter(|&(n, _)| n > 0)
            .collect();
        patched.sort_unstable_by(|a, b| b.cmp(a));
        for (_, c) in patched {
            if total <= budget {
                break;
            }
            let before = bytes(&plans, c);
            plans[c] = RegionPlan::Read;
            total = total - before + bytes(&plans, c);
        }
    }
    plans
}

/// One range to read: a whole region or one patch of it.
struct Read {
    region: usize,
    /// Which run of a patched region; 0 for a whole region.
    run: usize,
    start: u64,
    len: u64,
}

/// Backs up one device image. `sources` are independent readers (one per
/// thread); `map` is the readable change map when `plan` is incremental.
#[allow(clippy::too_many_arguments)]
pub fn backup_device(
    repo: &Repository,
    name: &str,
    now: &Tracking,
    plan: &Plan,
    previous: Option<&DeviceBackup>,
    map: Option<&[u8]>,
    sources: Vec<Box<dyn ImageSource>>,
    progress: Progress<'_>,
) -> Result<(DeviceBackup, Stats, BTreeSet<ChunkId>)> {
    let cs = chunk_size(now.block_size);
    let bs = u64::from(now.block_size);
    let count = now.size.div_ceil(cs) as usize;
    let region_len = |c: usize| cs.min(now.size - c as u64 * cs);
    let incremental = previous.filter(|_| plan.incremental);
    let plans = plan_regions(now, incremental, map.filter(|_| plan.incremental), count);
    let mut stats = Stats::default();
    let mut todo = Vec::new();
    for (c, p) in plans.iter().enumerate() {
        let start = c as u64 * cs;
        match p {
            RegionPlan::Reuse => stats.chunks_reused += 1,
            RegionPlan::Read => todo.push(Read {
                region: c,
                run: 0,
                start,
                len: region_len(c),
            }),
            RegionPlan::Patch { runs, .. } => {
                stats.regions_patched += 1;
                for (run, &(first, n)) in runs.iter().enumerate() {
                    let (at, len) = Patch(first, n, None).range(bs, region_len(c));
                    todo.push(Read {
                        region: c,
                        run,
                        start: start + at,
                        len,
                    });
                }
            }
        }
    }
    let total: u64 = todo.iter().map(|r| r.len).sum();
    let next = AtomicUsize::new(0);
    let done = AtomicU64::new(0);
    let results = Mutex::new(Vec::new());
    let first_error = Mutex::new(None);
    std::thread::scope(|scope| {
        for mut source in sources {
            let (todo, next, done, results, first_error) =
                (&todo, &next, &done, &results, &first_error);
            scope.spawn(move || {
                let mut local = Stats::default();
                let mut out = Vec::new();
                let mut buf = vec![0u8; cs as usize];
                while first_error.lock().unwrap().is_none() {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(read) = todo.get(i) else { break };
                    match backup_chunk(
                        repo,
                        source.as_mut(),
                        &mut buf[..read.len as usize],
                        read.start,
                        &mut local,
                    ) {
                        Ok(id) => out.push((read.region, read.run, id)),
                        Err(e) => {
                            *first_error.lock().unwrap() = Some(e);
                            break;
                        }
                    }
                    progress(
                        done.fetch_add(read.len, Ordering::Relaxed) + read.len,
                        total,
                    );
                }
                results.lock().unwrap().push((local, out));
            });
        }
    });
    if let Some(e) = first_error.into_inner().unwrap() {
        return Err(e);
    }
    let mut new = BTreeSet::new();
    let mut ids: std::collections::HashMap<(usize, usize), Option<ChunkId>> =
        std::collections::HashMap::new();
    for (local, out) in results.into_inner().unwrap() {
        stats.bytes_read += local.bytes_read;
        stats.bytes_new += local.bytes_new;
        stats.bytes_stored += local.bytes_stored;
        stats.chunks_deduplicated += local.chunks_deduplicated;
        stats.chunks_zero += local.chunks_zero;
        for (region, run, id) in out {
            if let Some(id) = &id {
                new.insert(id.clone());
            }
            ids.insert((region, run), id);
        }
    }
    let chunks = plans
        .iter()
        .enumerate()
        .map(|(c, p)| {
            let before = incremental.and_then(|prev| prev.chunks.get(c));
            planned_region(p, before, |run| {
                ids.remove(&(c, run)).expect("every planned read was done")
            })
        })
        .collect();
    let backup = DeviceBackup {
        name: name.to_string(),
        size: now.size,
        block_size: now.block_size,
        generation_id: now.generation_id,
        changes_number: now.changes_number,
        mode: if plan.incremental {
            "incremental"
        } else {
            "full"
        }
        .into(),
        reason: plan.reason.clone(),
        chunk_size: cs,
        chunks,
    };
    Ok((backup, stats, new))
}

/// One chunk: `None` when it reads as zeroes (skipped through the
/// allocation, or read and found zero), else its stored id.
fn backup_chunk(
    repo: &Repository,
    source: &mut dyn ImageSource,
    buf: &mut [u8],
    start: u64,
    stats: &mut Stats,
) -> Result<Option<ChunkId>> {
    let len = buf.len() as u64;
    let io = |e: io::Error| crate::repo::RepoError::Invalid(format!("image read at {start}: {e}"));
    let extents = source.zero_extents(start, len).map_err(io)?;
    if extents.iter().all(|&(_, zero)| zero) {
        stats.chunks_zero += 1;
        return Ok(None);
    }
    // Read the data extents only; zero ones are zero.
    let mut at = 0u64;
    for (elen, zero) in extents {
        let piece = &mut buf[at as usize..(at + elen) as usize];
        if zero {
            piece.fill(0);
        } else {
            source.read_at(piece, start + at).map_err(io)?;
            stats.bytes_read += elen;
        }
        at += elen;
    }
    if buf.iter().all(|&b| b == 0) {
        stats.chunks_zero += 1;
        return Ok(None);
    }
    let id = chunk_id(buf);
    match repo.put_chunk(&id, buf)? {
        Some(stored) => {
            stats.bytes_new += len;
            stats.bytes_stored += stored;
        }
        None => stats.chunks_deduplicated += 1,
    }
    Ok(Some(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An image in memory, with every read counted.
    struct Mem {
        data: std::sync::Arc<Vec<u8>>,
        reads: std::sync::Arc<AtomicU64>,
    }

    impl ImageSource for Mem {
        fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            self.reads.fetch_add(buf.len() as u64, Ordering::Relaxed);
            buf.copy_from_slice(&self.data[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn zero_extents(&mut self, offset: u64, len: u64) -> io::Result<Vec<(u64, bool)>> {
            Ok(vec![(
                len,
                self.data[offset as usize..(offset + len) as usize]
                    .iter()
                    .all(|&b| b == 0),
            )])
        }
    }

    fn tracking(size: u64, generation: Uuid, n: u8) -> Tracking {
        Tracking {
            size,
            block_size: 65536,
            generation_id: generation,
            changes_number: n,
            generation_reason: "attached".into(),
        }
    }

    /// Runs one backup of `data` against `prev` with 3 readers.
    fn run(
        repo: &Repository,
        data: &[u8],
        now: &Tracking,
        prev: Option<&DeviceBackup>,
        map: Option<&[u8]>,
        reads: &std::sync::Arc<AtomicU64>,
    ) -> (DeviceBackup, Stats) {
        let data = std::sync::Arc::new(data.to_vec());
        let sources: Vec<Box<dyn ImageSource>> = (0..3)
            .map(|_| {
                Box::new(Mem {
                    data: data.clone(),
                    reads: reads.clone(),
                }) as Box<dyn ImageSource>
            })
            .collect();
        let p = plan(prev, now);
        let (backup, stats, new) =
            backup_device(repo, "d", now, &p, prev, map, sources, &|_, _| {}).unwrap();
        repo.sync_chunks(&new).unwrap();
        (backup, stats)
    }

    /// The device as the backup holds it, region by region.
    fn read_back(repo: &Repository, b: &DeviceBackup) -> Vec<u8> {
        let mut all = Vec::new();
        let mut region = Vec::new();
        for i in 0..b.chunks.len() {
            b.read_region(repo, i, &mut region).unwrap();
            all.extend_from_slice(&region);
        }
        all
    }

    #[test]
    fn an_incremental_reads_only_changed_blocks_and_restores_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::open(&dir.path().join("r"), true).unwrap();
        let size = 5 * (4 << 20) + 12345;
        let mut data = blksnap_test_support::Pattern::Random.bytes(1, size);
        data[(4 << 20)..(8 << 20)].fill(0); // chunk 1 is a hole
        let generation = Uuid::new_v4();
        let reads = std::sync::Arc::new(AtomicU64::new(0));
        let (full, stats) = run(
            &repo,
            &data,
            &tracking(size, generation, 1),
            None,
            None,
            &reads,
        );
        assert_eq!(full.mode, "full");
        assert_eq!(full.chunks[1], Region::Whole(None));
        assert_eq!(stats.bytes_read, size - (4 << 20));
        // Change one block in chunk 3 and the short last block of the
        // device; the map says so (number 2 > 1).
        data[3 * (4 << 20) + 100] ^= 0xff;
        data[size as usize - 1] ^= 0xff;
        let blocks = size.div_ceil(65536) as usize;
        let mut map = vec![1u8; blocks];
        map[3 * 64] = 2;
        map[blocks - 1] = 2;
        reads.store(0, Ordering::Relaxed);
        let now = tracking(size, generation, 2);
        let (inc, stats) = run(&repo, &data, &now, Some(&full), Some(&map), &reads);
        assert_eq!(inc.mode, "incremental");
        assert_eq!((stats.chunks_reused, stats.regions_patched), (4, 2));
        assert_eq!(
            reads.load(Ordering::Relaxed),
            65536 + 12345, // the last block is 12345 bytes
            "only the changed blocks are read"
        );
        assert!(matches!(&inc.chunks[3], Region::Patched { patches, .. } if patches.len() == 1));
        assert!(read_back(&repo, &inc) == data);
        // The same block again: the old patch is covered and dropped.
        data[3 * (4 << 20) + 200] ^= 0xff;
        map[3 * 64] = 3;
        let (again, _) = run(
            &repo,
            &data,
            &tracking(size, generation, 3),
            Some(&inc),
            Some(&map),
            &reads,
        );
        assert!(matches!(&again.chunks[3], Region::Patched { patches, .. } if patches.len() == 1));
        assert!(read_back(&repo, &again) == data);
        // Another generation: full, with the reason.
        let other = plan(Some(&inc), &tracking(size, Uuid::new_v4(), 1));
        assert!(
            !other.incremental && other.reason.contains("generation"),
            "{other:?}"
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
        /// Model: a device (bytes) under random writes (runs of blocks,
        /// some zeroes) with a change map, backed up after each round.
        /// Every backup reads back as the device at its take, reads no
        /// more than the changed blocks plus the regions it reads whole,
        /// and keeps its chunk list within the index budget.
        #[test]
        fn incrementals_follow_a_model_device(
            rounds in proptest::collection::vec(
                proptest::collection::vec((0usize..200, 1usize..40, proptest::bool::ANY), 0..12),
                1..6,
            ),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let repo = Repository::open(&dir.path().join("r"), true).unwrap();
            let bs = 65536usize;
            let size = 3 * (4 << 20) + 3 * bs as u64 + 4000;
            let blocks = size.div_ceil(bs as u64) as usize;
            let mut data = blksnap_test_support::Pattern::Random.bytes(7, size);
            let mut map = vec![1u8; blocks];
            let generation = Uuid::new_v4();
            let reads = std::sync::Arc::new(AtomicU64::new(0));
            let (mut last, _) = run(&repo, &data, &tracking(size, generation, 1), None, None, &reads);
            proptest::prop_assert!(read_back(&repo, &last) == data);
            for (n, writes) in rounds.iter().enumerate() {
                let number = n as u8 + 2;
                let mut changed = 0u64;
                for (round, &(first, count, zero)) in writes.iter().enumerate() {
                    let first = first % blocks;
                    let last_block = (first + count).min(blocks);
                    for (b, byte) in map.iter_mut().enumerate().take(last_block).skip(first) {
                        let at = b * bs;
                        let end = (at + bs).min(size as usize);
                        if zero {
                            data[at..end].fill(0);
                        } else {
                            data[at..end].fill((round + 3 * n + 1) as u8);
                        }
                        if *byte != number {
                            changed += (end - at) as u64;
                        }
                        *byte = number;
                    }
                }
                reads.store(0, Ordering::Relaxed);
                let now = tracking(size, generation, number);
                let (backup, stats) = run(&repo, &data, &now, Some(&last), Some(&map), &reads);
                proptest::prop_assert!(read_back(&repo, &backup) == data, "round {n}");
                // Regions read whole: a whole entry that is new, or that
                // had changed blocks (read again, it may come out as the
                // same chunk as before).
                let bpc = (4 << 20) / bs;
                let whole: u64 = backup.chunks.iter().enumerate()
                    .filter(|(i, r)| {
                        let blocks = &map[i * bpc..((i + 1) * bpc).min(blocks)];
                        let touched = blocks.contains(&number);
                        (**r != last.chunks[*i] || touched) && matches!(r, Region::Whole(_))
                    })
                    .map(|(i, _)| backup.region_len(i))
                    .sum();
                proptest::prop_assert!(reads.load(Ordering::Relaxed) <= changed + whole);
                proptest::prop_assert!(stats.bytes_read <= changed + whole);
                let index: usize = backup.chunks.iter().map(Region::index_bytes).sum();
                proptest::prop_assert!(index <= backup.chunks.len() * INDEX_BYTES_PER_REGION);
                proptest::prop_assert!(backup.chunks.iter().all(|r| r.patch_count() <= MAX_PATCHES));
                last = backup;
            }
        }
    }
}
