//! Edge cases of format 2 end to end: backups of a model device (several
//! tracking block sizes, sizes that are not a multiple of the tracking
//! block or of 4 KiB) under random writes, each one read back, restored to
//! a file and served, and compared with the device at its take; regions
//! filling up with patches to the limit and the index budget; chunk files
//! of lengths around the 4 KiB `O_DIRECT` reads; and chunk files a power
//! loss left empty or cut, which a later backup must write again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use blksnap_backup::create::{backup_device, plan, ImageSource, Tracking};
use blksnap_backup::repo::{DeviceBackup, Region, Repository};
use blksnap_backup::restore::restore;
use blksnap_backup::serve::BackupExports;
use blksnap_nbd::ExportSource;
use uuid::Uuid;

/// An image in memory, reads counted, allocation exact per 4 KiB.
struct Mem {
    data: Arc<Vec<u8>>,
    reads: Arc<AtomicU64>,
}

impl ImageSource for Mem {
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.reads.fetch_add(buf.len() as u64, Ordering::Relaxed);
        buf.copy_from_slice(&self.data[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn zero_extents(&mut self, offset: u64, len: u64) -> std::io::Result<Vec<(u64, bool)>> {
        let mut out: Vec<(u64, bool)> = Vec::new();
        let end = offset + len;
        let mut at = offset;
        while at < end {
            let next = ((at / 4096 + 1) * 4096).min(end);
            let zero = self.data[at as usize..next as usize]
                .iter()
                .all(|&b| b == 0);
            match out.last_mut() {
                Some(last) if last.1 == zero => last.0 += next - at,
                _ => out.push((next - at, zero)),
            }
            at = next;
        }
        Ok(out)
    }
}

fn backup(
    repo: &Repository,
    data: &[u8],
    now: &Tracking,
    prev: Option<&DeviceBackup>,
    map: Option<&[u8]>,
) -> (DeviceBackup, u64) {
    let data = Arc::new(data.to_vec());
    let reads = Arc::new(AtomicU64::new(0));
    let sources: Vec<Box<dyn ImageSource>> = (0..3)
        .map(|_| {
            Box::new(Mem {
                data: data.clone(),
                reads: reads.clone(),
            }) as Box<dyn ImageSource>
        })
        .collect();
    let p = plan(prev, now);
    let (b, _, new) = backup_device(repo, "d", now, &p, prev, map, sources, &|_, _| {}).unwrap();
    repo.sync_chunks(&new).unwrap();
    (b, reads.load(Ordering::Relaxed))
}

/// Everything a backup can be read through, against `want`.
fn check_all_ways(repo: &Arc<Repository>, dir: &std::path::Path, b: &DeviceBackup, want: &[u8]) {
    assert_eq!(b.size, want.len() as u64);
    assert_eq!(b.chunks.len() as u64, b.size.div_ceil(b.chunk_size));
    // Region by region.
    let mut all = Vec::new();
    let mut region = Vec::new();
    for i in 0..b.chunks.len() {
        b.read_region(repo, i, &mut region).unwrap();
        assert_eq!(region.len() as u64, b.region_len(i), "region {i}");
        all.extend_from_slice(&region);
    }
    assert!(all == want, "read back");
    // Restored to a file.
    let to = dir.join(format!("restored-{}", fastrand::u64(..)));
    restore(repo, b, &to, 4).unwrap();
    let restored = std::fs::read(&to).unwrap();
    assert_eq!(restored.len(), want.len(), "restored size");
    assert!(restored == want, "restored");
    std::fs::remove_file(&to).unwrap();
    // Served: reads at region boundaries, across them, the last byte, and
    // random ranges; allocation says zero only where it is.
    let manifest = blksnap_backup::repo::Manifest {
        format: blksnap_backup::repo::FORMAT,
        id: "x".into(),
        time: 0,
        host: "h".into(),
        devices: vec![b.clone()],
    };
    let exports = BackupExports::new(repo.clone(), &manifest);
    let e = exports.open("d").unwrap();
    assert_eq!(e.size(), b.size);
    let size = b.size;
    let cs = b.chunk_size;
    let mut ranges = vec![(0, size.min(1 << 20)), (size - 1, 1), (0, 0)];
    for i in 1..b.chunks.len() as u64 {
        let edge = i * cs;
        ranges.push((edge - 1, 2));
        ranges.push((
            edge.saturating_sub(5000),
            (10000).min(size - edge.saturating_sub(5000)),
        ));
    }
    let mut rng = fastrand::Rng::with_seed(size);
    for _ in 0..20 {
        let at = rng.u64(0..size);
        let len = rng.u64(0..=(size - at).min(3 * cs));
        ranges.push((at, len));
    }
    for (at, len) in ranges {
        let mut buf = vec![0xa5u8; len as usize];
        e.read(&mut buf, at).unwrap();
        assert!(
            buf[..] == want[at as usize..(at + len) as usize],
            "served {at}+{len}"
        );
        if len == 0 {
            continue;
        }
        let extents = e.allocation(at, len).unwrap();
        assert_eq!(
            extents.iter().map(|x| x.0).sum::<u64>(),
            len,
            "extents of {at}+{len}"
        );
        let mut pos = at;
        for (elen, zero) in extents {
            if zero {
                assert!(
                    want[pos as usize..(pos + elen) as usize]
                        .iter()
                        .all(|&x| x == 0),
                    "a hole at {pos}+{elen} that is not zero"
                );
            }
            pos += elen;
        }
    }
}

/// Rounds of random writes to a model device with a change map, backed up
/// after each; returns the backups.
fn model(bs: u32, size: u64, seed: u64, rounds: usize) {
    model_with(bs, size, seed, rounds, 10);
}

/// [`model`] with up to `writes` writes a round.
fn model_with(bs: u32, size: u64, seed: u64, rounds: usize, writes: usize) {
    let dir = tempfile::tempdir().unwrap();
    let repo = Arc::new(Repository::open(&dir.path().join("r"), true).unwrap());
    let bsu = bs as usize;
    let blocks = size.div_ceil(u64::from(bs)) as usize;
    let mut data = blksnap_test_support::Pattern::RandomFill.bytes(seed, size);
    // Some zero blocks from the start.
    for b in (0..blocks).step_by(7) {
        let end = ((b + 1) * bsu).min(size as usize);
        data[b * bsu..end].fill(0);
    }
    let generation = Uuid::new_v4();
    let tracking = |n: u8| Tracking {
        size,
        block_size: bs,
        generation_id: generation,
        changes_number: n,
        generation_reason: "attached".into(),
    };
    let mut map = vec![1u8; blocks];
    let (mut last, _) = backup(&repo, &data, &tracking(1), None, None);
    check_all_ways(&repo, dir.path(), &last, &data);
    let mut rng = fastrand::Rng::with_seed(seed);
    for round in 0..rounds {
        let number = round as u8 + 2;
        let mut changed = 0u64;
        for w in 0..rng.usize(0..writes) {
            // Mostly short writes, now and then long ones; the last
            // block often.
            let first = if rng.u8(..4) == 0 {
                blocks - 1
            } else {
                rng.usize(0..blocks)
            };
            let count = if rng.u8(..5) == 0 {
                rng.usize(1..=blocks)
            } else {
                rng.usize(1..4)
            };
            let zero = rng.bool();
            let last_block = (first + count).min(blocks);
            for (b, byte) in map.iter_mut().enumerate().take(last_block).skip(first) {
                // Within the block: part of it only, as a real write.
                let at = b * bsu;
                let end = ((b + 1) * bsu).min(size as usize);
                let from = at + rng.usize(0..end - at);
                let to = rng.usize(from + 1..=end);
                if zero {
                    data[from..to].fill(0);
                } else {
                    data[from..to].fill((w + 1 + 16 * round) as u8);
                }
                if *byte != number {
                    changed += (end - at) as u64;
                }
                *byte = number;
            }
        }
        let (b, reads) = backup(&repo, &data, &tracking(number), Some(&last), Some(&map));
        assert_eq!(b.mode, "incremental");
        check_all_ways(&repo, dir.path(), &b, &data);
        let whole: u64 = b
            .chunks
            .iter()
            .enumerate()
            .filter(|(i, r)| {
                // Read whole: a new whole entry, or one with changed blocks
                // (read again, it can be the same chunk as before).
                let bpc = (b.chunk_size / u64::from(bs)) as usize;
                let touched = map[i * bpc..((i + 1) * bpc).min(blocks)].contains(&number);
                (**r != last.chunks[*i] || touched) && matches!(r, Region::Whole(_))
            })
            .map(|(i, _)| b.region_len(i))
            .sum();
        assert!(
            reads <= changed + whole,
            "read {reads} of {changed} + {whole}"
        );
        let index: usize = b.chunks.iter().map(Region::index_bytes).sum();
        assert!(index <= b.chunks.len() * 128, "index {index}");
        assert!(b.chunks.iter().all(|r| r.patch_count() <= 16));
        // Prune to this one: it still reads in full.
        repo.put_manifest(&blksnap_backup::repo::Manifest {
            format: blksnap_backup::repo::FORMAT,
            id: format!("{round:04}"),
            time: 0,
            host: "h".into(),
            devices: vec![b.clone()],
        })
        .unwrap();
        repo.prune(1).unwrap();
        assert!(repo.verify(&[format!("{round:04}")]).unwrap().is_empty());
        last = b;
    }
}

#[test]
fn small_tracking_blocks_and_an_odd_size() {
    model(4096, 2 * (4 << 20) + 3 * 4096 + 100, 1, 8);
}

#[test]
fn tracking_blocks_of_64k_and_a_short_last_block() {
    model(65536, 3 * (4 << 20) + 5 * 65536 + 4097, 2, 8);
}

#[test]
fn tracking_blocks_as_large_as_a_region() {
    model(4 << 20, 2 * (4 << 20) + 511, 3, 6);
}

#[test]
fn tracking_blocks_larger_than_4m() {
    model(8 << 20, 2 * (8 << 20) + 12345, 4, 5);
}

#[test]
fn a_device_smaller_than_one_block() {
    model(65536, 1000, 5, 6);
    model(4096, 4096, 6, 6);
}

/// Chunk files of every length around the 4 KiB `O_DIRECT` reads: raw
/// (incompressible) ones whose file is exactly 4 KiB, 8 KiB, one byte more
/// or less, and tiny ones.
#[test]
fn chunk_files_of_aligned_and_unaligned_lengths_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Repository::open(&dir.path().join("r"), true).unwrap();
    const HEADER: usize = 16;
    for file_len in [
        HEADER + 1,
        4095,
        4096,
        4097,
        8191,
        8192,
        8193,
        (4 << 20) + HEADER,
        4 << 20,
    ] {
        let data = blksnap_test_support::Pattern::Random
            .bytes(file_len as u64, (file_len - HEADER) as u64);
        let id = blksnap_backup::repo::chunk_id(&data);
        repo.put_chunk(&id, &data).unwrap();
        repo.sync_chunks(&[id.clone()].into()).unwrap();
        let path = dir.path().join("r/chunks").join(&id[..2]).join(&id);
        assert_eq!(std::fs::metadata(&path).unwrap().len() as usize, file_len);
        // Twice: the second read reuses this thread's buffer.
        for _ in 0..2 {
            assert!(
                repo.get_chunk(&id, data.len() as u64).unwrap() == data,
                "{file_len}"
            );
        }
    }
    // An empty chunk file (as a crash may leave one) is damage, not data.
    let data = vec![1u8; 100];
    let id = blksnap_backup::repo::chunk_id(&data);
    let path = dir.path().join("r/chunks").join(&id[..2]).join(&id);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, b"").unwrap();
    assert!(repo.get_chunk(&id, 100).is_err());
}

/// What a power loss can leave of a chunk renamed into `chunks/` before
/// the `syncfs` that would have made its data durable: the name, with an
/// empty (or cut) file behind it. A later backup of the same data must not
/// take that file for the chunk: it would name a chunk that cannot be read,
/// and every incremental after it would keep naming it.
#[test]
fn a_later_backup_does_not_trust_a_chunk_file_a_crash_left_empty_or_cut() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Arc::new(Repository::open(&dir.path().join("r"), true).unwrap());
    let size = 3 * (4 << 20) + 5000;
    let data = blksnap_test_support::Pattern::Random.bytes(9, size);
    let chunk_path = |id: &str| dir.path().join("r/chunks").join(&id[..2]).join(id);
    // Region 0 left empty, region 1 cut after its header and a bit, and
    // region 2 (short, 5000 bytes) cut short.
    let region = |i: usize| &data[i * (4 << 20)..((i + 1) * (4 << 20)).min(size as usize)];
    let leftovers: Vec<(String, usize)> = vec![
        (blksnap_backup::repo::chunk_id(region(0)), 0),
        (blksnap_backup::repo::chunk_id(region(1)), 16 + 1000),
        (blksnap_backup::repo::chunk_id(region(2)), 16 + 4000),
    ];
    // The real files first, to cut them as a crash would.
    for (i, (id, _)) in leftovers.iter().enumerate() {
        repo.put_chunk(id, region(i)).unwrap();
    }
    repo.sync_chunks(&leftovers.iter().map(|(id, _)| id.clone()).collect())
        .unwrap();
    for (id, keep) in &leftovers {
        let bytes = std::fs::read(chunk_path(id)).unwrap();
        std::fs::write(chunk_path(id), &bytes[..*keep]).unwrap();
    }
    let now = Tracking {
        size,
        block_size: 65536,
        generation_id: Uuid::new_v4(),
        changes_number: 1,
        generation_reason: "attached".into(),
    };
    let (b, _) = backup(&repo, &data, &now, None, None);
    let manifest = blksnap_backup::repo::Manifest {
        format: blksnap_backup::repo::FORMAT,
        id: "1".into(),
        time: 0,
        host: "h".into(),
        devices: vec![b.clone()],
    };
    repo.put_manifest(&manifest).unwrap();
    let damage = repo.verify(&["1".into()]).unwrap();
    assert!(
        damage.is_empty(),
        "the new backup names damaged chunks: {damage:?}"
    );
    check_all_ways(&repo, dir.path(), &b, &data);
}

/// Many scattered writes a round: regions reach the patch limit and the
/// chunk list its budget, so regions are read whole to compact it.
#[test]
fn scattered_writes_compact_the_chunk_list() {
    model_with(4096, 5 * (4 << 20) + 3 * 4096 + 77, 7, 12, 60);
    model_with(65536, 4 * (4 << 20) + 100, 8, 12, 40);
}

/// One more scattered block a round in the first two regions of a larger
/// device: region 0 gathers patches up to the limit and is then read
/// whole; the two together outgrow the budget, which reads the most
/// patched whole. Every backup on the way reads back exactly.
#[test]
fn patches_pile_up_to_the_limit_and_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let repo = Arc::new(Repository::open(&dir.path().join("r"), true).unwrap());
    let bs = 65536u32;
    let size: u64 = 40 * (4 << 20) + 1000;
    let blocks = size.div_ceil(u64::from(bs)) as usize;
    let mut data = blksnap_test_support::Pattern::RandomFill.bytes(11, size);
    let generation = Uuid::new_v4();
    let tracking = |n: u8| Tracking {
        size,
        block_size: bs,
        generation_id: generation,
        changes_number: n,
        generation_reason: "attached".into(),
    };
    let mut map = vec![1u8; blocks];
    let (mut last, _) = backup(&repo, &data, &tracking(1), None, None);
    let (mut most, mut whole_again, mut compacted) = (0, false, false);
    for round in 0..40usize {
        let number = round as u8 + 2;
        // Blocks 0, 2, 4, ... of region 0; from round 10 on, of region 1
        // too; and the device's last (short) block now and then.
        let mut touched = vec![2 * (round % 30)];
        if round >= 10 {
            touched.push(64 + 2 * (round % 30));
        }
        if round % 3 == 0 {
            touched.push(blocks - 1);
        }
        for &b in &touched {
            let at = b * bs as usize;
            let end = (at + bs as usize).min(size as usize);
            data[at + 7..end].fill(round as u8 + 1);
            map[b] = number;
        }
        let (b, _) = backup(&repo, &data, &tracking(number), Some(&last), Some(&map));
        // The regions written (all of them at the end).
        let mut region = Vec::new();
        for i in [0, 1, b.chunks.len() - 1] {
            b.read_region(&repo, i, &mut region).unwrap();
            let at = i * (4 << 20);
            assert!(
                region[..] == data[at..at + region.len()],
                "round {round} region {i}"
            );
        }
        let index: usize = b.chunks.iter().map(Region::index_bytes).sum();
        assert!(index <= b.chunks.len() * 128, "index {index}");
        let n = b.chunks[0].patch_count();
        assert!(n <= 16);
        if most == 16 && n <= 1 {
            whole_again = true;
        }
        most = most.max(n);
        if last.chunks[1].patch_count() > 0
            && matches!(b.chunks[1], Region::Whole(_))
            && round % 30 != 0
        {
            compacted = true;
        }
        last = b;
    }
    check_all_ways(&repo, dir.path(), &last, &data);
    assert_eq!(most, 16, "region 0 reached the patch limit");
    assert!(whole_again, "and was then read whole");
    assert!(compacted, "the budget read region 1 whole");
}
