//! First writes to a sparse origin file: a chunk that is a hole on the
//! origin at its first write (no data, none in the page cache either) is
//! kept without a copy when its storage slot reads as zeroes already (grown
//! space), and written with zeroes when it does not (a storage file that
//! held data). Either way the image reads the content at the take, zeroes
//! included, and the image's `hole_chunks` tells which chunks took the
//! hole path, so no test passes on the plain copy alone.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;

use blksnap_engine::{Engine, ImageInfo, StorageSpec};
use blksnap_test_support::Pattern;
use common::{image_matches_then_destroy, small_config, snapshot_one};

mod common;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// The chunk size of `small_config` for this origin.
const CHUNK: u64 = 64 * KIB;
/// Four MiB and a last chunk of 12 KiB.
const SIZE: u64 = 4 * MIB + 12 * KIB;

/// Data in the file before the engine opens it: (offset, length).
const ON_DISK: [(u64, u64); 2] = [(0, 8 * KIB), (10 * CHUNK + 60 * KIB, 4 * KIB)];
/// Written through the engine before the take, into a hole: only in the
/// page cache at the take, and the hole test must see it.
const DIRTY_AT: u64 = 20 * CHUNK + 4 * KIB;
/// The first writes after the take: (offset, length).
const WRITES: [(u64, u64); 6] = [
    (4 * KIB, 4 * KIB),               // chunk 0: data
    (5 * CHUNK + 512, 4 * KIB),       // chunk 5: hole
    (10 * CHUNK, 4 * KIB),            // chunk 10: data at its end only
    (20 * CHUNK + 32 * KIB, 4 * KIB), // chunk 20: data in the page cache
    (40 * CHUNK, MIB),                // chunks 40..56: holes
    (SIZE - 4 * KIB, 4 * KIB),        // the last, partial chunk: hole
];
const CHUNKS_COPIED: u64 = 4 + 16 + 1;
const HOLE_CHUNKS: u64 = 1 + 16 + 1;

/// Makes the sparse origin in `dir`, snapshots it with `storage`, makes
/// the first writes, and checks that the image reads the content at the
/// take. Returns the image's figures.
fn first_writes_keep_the_take(dir: &Path, storage: StorageSpec) -> ImageInfo {
    let path = dir.join("origin.img");
    let file = fs::File::create(&path).unwrap();
    file.set_len(SIZE).unwrap();
    let mut at_take = vec![0u8; SIZE as usize];
    for (i, &(offset, len)) in ON_DISK.iter().enumerate() {
        let data = Pattern::RandomFill.bytes(1 + i as u64, len);
        file.write_all_at(&data, offset).unwrap();
        at_take[offset as usize..][..len as usize].copy_from_slice(&data);
    }
    file.sync_all().unwrap();
    drop(file);
    let engine = Engine::new(small_config()).unwrap();
    let dev = engine.attach_path(&path, Some("origin")).unwrap();
    let dirty = Pattern::RandomFill.bytes(9, 4 * KIB);
    dev.write(&dirty, DIRTY_AT).unwrap();
    at_take[DIRTY_AT as usize..][..dirty.len()].copy_from_slice(&dirty);

    let id = snapshot_one(&engine, "origin", storage);
    let image = engine.image("origin").unwrap();
    assert_eq!(image.chunk_size(), CHUNK, "the chunk size the test assumes");
    for (i, &(offset, len)) in WRITES.iter().enumerate() {
        dev.write(&Pattern::RandomFill.bytes(10 + i as u64, len), offset)
            .unwrap();
    }
    drop(image);
    let info = image_matches_then_destroy(&engine, &id, "origin", &at_take);
    assert_eq!(info.copied_chunks, CHUNKS_COPIED, "chunks copied");
    assert_eq!(info.hole_chunks, HOLE_CHUNKS, "chunks that were holes");
    info
}

/// Storage in a directory: grown space, which reads as zeroes, so hole
/// chunks cost no data write. The storage file's allocated data shows it:
/// only the copied data chunks were written into it.
#[test]
fn hole_chunks_in_grown_storage_are_not_written() {
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("diff.img");
    fs::File::create(&storage).unwrap();
    first_writes_keep_the_take(dir.path(), StorageSpec::Path(storage.clone()));

    // The same with the named file kept by a second snapshot, to look at
    // what was written into it (the destroy gave the space back).
    let engine = Engine::new(small_config()).unwrap();
    let dev = engine
        .attach_path(&dir.path().join("origin.img"), Some("origin"))
        .unwrap();
    let id = snapshot_one(&engine, "origin", StorageSpec::Path(storage.clone()));
    // A hole chunk first, then a data chunk.
    dev.write(&[7; 4096], 60 * CHUNK).unwrap();
    dev.write(&[7; 4096], 0).unwrap();
    let info = engine.snapshot_info(&id).unwrap().images.remove(0);
    assert_eq!((info.copied_chunks, info.hole_chunks), (2, 1));
    let written = data_bytes(&storage);
    assert_eq!(written, CHUNK, "one chunk of data written into the storage");
    engine.snapshot_destroy(&id).unwrap();
}

/// Bytes of `path` that hold data, by `SEEK_DATA`/`SEEK_HOLE` (space
/// reserved with fallocate and never written counts as a hole).
fn data_bytes(path: &Path) -> u64 {
    use rustix::fs::{seek, SeekFrom};
    let file = fs::File::open(path).unwrap();
    let len = file.metadata().unwrap().len();
    let (mut pos, mut total) = (0, 0);
    while pos < len {
        let Ok(data) = seek(&file, SeekFrom::Data(pos)) else {
            break;
        };
        let hole = seek(&file, SeekFrom::Hole(data)).unwrap();
        total += hole - data;
        pos = hole;
    }
    total
}

/// Storage in a file that held data, used with its content: its slots do
/// not read as zeroes, so hole chunks are written with zeroes (the image
/// would show the file's old bytes otherwise).
#[test]
fn hole_chunks_in_storage_with_old_content_are_zeroed() {
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("diff.img");
    fs::write(&storage, vec![0xAB; (SIZE * 2) as usize]).unwrap();
    first_writes_keep_the_take(dir.path(), StorageSpec::Path(storage));
}
