//! Backing up one device image into the repository: which chunks to read
//! (all, or in an incremental only those holding a block changed since the
//! last backup), holes skipped through the image's allocation, every chunk
//! hashed and stored once.
//!
//! Invariants: the manifest entry of a chunk that is not read is the
//! previous backup's entry for it, which is only done when the change map
//! proves the chunk unchanged (same generation and block size, every block
//! of the chunk at or below the previous backup's change number). A chunk
//! is named in a manifest only after it is stored ([`Repository`]).
//!
//! Callers: `main` (the `create` command), with an [`ImageSource`] per
//! reader thread (an NBD connection to the snapshot image).

use std::collections::BTreeSet;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use serde::Serialize;
use uuid::Uuid;

use crate::repo::{chunk_id, ChunkId, DeviceBackup, Repository, Result};

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
    /// Chunks taken from the previous backup without reading.
    pub chunks_reused: u64,
    pub chunks_zero: u64,
}

/// Reports progress: bytes done so far of the bytes this backup must look
/// at (the chunks it does not take from the previous backup).
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Sync);

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
    let count = now.size.div_ceil(cs) as usize;
    let blocks_per_chunk = (cs / u64::from(now.block_size)) as usize;
    let mut chunks: Vec<Option<ChunkId>> = vec![None; count];
    let reuse: Vec<bool> = match (plan.incremental, previous, map) {
        (true, Some(p), Some(map)) => (0..count)
            .map(|c| {
                let blocks = &map[(c * blocks_per_chunk).min(map.len())
                    ..((c + 1) * blocks_per_chunk).min(map.len())];
                blocks.iter().all(|&b| b <= p.changes_number)
            })
            .collect(),
        _ => vec![false; count],
    };
    let mut stats = Stats::default();
    for c in 0..count {
        if reuse[c] {
            chunks[c] = previous.expect("reuse needs a previous backup").chunks[c].clone();
            stats.chunks_reused += 1;
        }
    }
    let todo: Vec<usize> = (0..count).filter(|&c| !reuse[c]).collect();
    let total: u64 = todo.iter().map(|&c| cs.min(now.size - c as u64 * cs)).sum();
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
                    let Some(&c) = todo.get(i) else { break };
                    let start = c as u64 * cs;
                    let len = cs.min(now.size - start);
                    match backup_chunk(
                        repo,
                        source.as_mut(),
                        &mut buf[..len as usize],
                        start,
                        &mut local,
                    ) {
                        Ok(id) => out.push((c, id)),
                        Err(e) => {
                            *first_error.lock().unwrap() = Some(e);
                            break;
                        }
                    }
                    progress(done.fetch_add(len, Ordering::Relaxed) + len, total);
                }
                results.lock().unwrap().push((local, out));
            });
        }
    });
    if let Some(e) = first_error.into_inner().unwrap() {
        return Err(e);
    }
    let mut new = BTreeSet::new();
    for (local, out) in results.into_inner().unwrap() {
        stats.bytes_read += local.bytes_read;
        stats.bytes_new += local.bytes_new;
        stats.bytes_stored += local.bytes_stored;
        stats.chunks_deduplicated += local.chunks_deduplicated;
        stats.chunks_zero += local.chunks_zero;
        for (c, id) in out {
            if let Some(id) = &id {
                new.insert(id.clone());
            }
            chunks[c] = id;
        }
    }
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

    #[test]
    fn an_incremental_reads_only_changed_chunks_and_restores_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::open(&dir.path().join("r"), true).unwrap();
        let size = 5 * (4 << 20) + 12345;
        let mut data = blksnap_test_support::Pattern::Random.bytes(1, size);
        data[(4 << 20)..(8 << 20)].fill(0); // chunk 1 is a hole
        let generation = Uuid::new_v4();
        let reads = std::sync::Arc::new(AtomicU64::new(0));
        let run =
            |data: &Vec<u8>, now: &Tracking, prev: Option<&DeviceBackup>, map: Option<&[u8]>| {
                let data = std::sync::Arc::new(data.clone());
                let sources: Vec<Box<dyn ImageSource>> = (0..3)
                    .map(|_| {
                        Box::new(Mem {
                            data: data.clone(),
                            reads: reads.clone(),
                        }) as Box<dyn ImageSource>
                    })
                    .collect();
                let p = plan(prev, now);
                backup_device(&repo, "d", now, &p, prev, map, sources, &|_, _| {}).unwrap()
            };
        let (full, stats, _) = run(&data, &tracking(size, generation, 1), None, None);
        assert_eq!(full.mode, "full");
        assert_eq!(full.chunks[1], None);
        assert_eq!(stats.bytes_read, size - (4 << 20));
        // Change one block in chunk 3; the map says so (number 2 > 1).
        data[3 * (4 << 20) + 100] ^= 0xff;
        let blocks = size.div_ceil(65536) as usize;
        let mut map = vec![1u8; blocks];
        map[3 * 64] = 2;
        reads.store(0, Ordering::Relaxed);
        let (inc, stats, _) = run(
            &data,
            &tracking(size, generation, 2),
            Some(&full),
            Some(&map),
        );
        assert_eq!(inc.mode, "incremental");
        assert_eq!(stats.chunks_reused, 5);
        assert_eq!(
            reads.load(Ordering::Relaxed),
            4 << 20,
            "only the changed chunk is read"
        );
        assert_ne!(inc.chunks[3], full.chunks[3]);
        // Every chunk of the incremental reads back as the data.
        for (c, id) in inc.chunks.iter().enumerate() {
            let start = c * (4 << 20);
            let len = inc.chunk_len(c) as usize;
            let got = match id {
                Some(id) => repo.get_chunk(id, len as u64).unwrap(),
                None => vec![0; len],
            };
            assert!(got == data[start..start + len], "chunk {c}");
        }
        // Another generation: full, with the reason.
        let other = plan(Some(&inc), &tracking(size, Uuid::new_v4(), 1));
        assert!(
            !other.incremental && other.reason.contains("generation"),
            "{other:?}"
        );
    }
}
