//! Copy-on-write inside the kernel (`copy_file_range(2)`) on real files: the
//! image keeps the content at the take after first writes to chunks at the
//! start, in the middle and at the end (a last partial chunk) of the origin,
//! and to a chunk whose take-time content was still only in the page cache.
//! The image's copy counts tell which path moved the data, so no test passes
//! on the fallback alone.
//!
//! - `same_filesystem_copies_in_the_kernel`: origin and storage in one
//!   temporary directory (ext4 here; not xfs, where the engine does not copy
//!   in the kernel): every chunk is copied in the kernel.
//! - `storage_on_another_filesystem_copies_through_user_space`: storage in
//!   /dev/shm (tmpfs): the kernel refuses (EXDEV), every chunk goes through
//!   a buffer.
//! - `btrfs_copies_share_extents` (root): both on a loop-mounted btrfs, where
//!   the copy is a reflink: the storage file's extents are shared.
//! - `xfs_copies_through_user_space` (root): both on a loop-mounted xfs,
//!   where a reflink would be slower, so the engine copies through a buffer.
//!
//! Tests needing root skip loudly when they cannot run, and fail instead
//! when the `CI` environment variable is set.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use blksnap_engine::{Engine, ImageInfo, StorageSpec};
use blksnap_test_support::{is_root, Pattern};
use common::{image_matches_then_destroy, small_config, snapshot_one};

mod common;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// The chunk size of `small_config` for this origin.
const CHUNK: u64 = 64 * KIB;
/// Four MiB and a last chunk of 12 KiB.
const SIZE: u64 = 4 * MIB + 12 * KIB;

/// The first writes of every test: (offset, length). The start, a middle
/// chunk, a 1 MiB run over 16 chunks, and the last partial chunk.
const WRITES: [(u64, u64); 4] = [
    (0, 4 * KIB),
    (32 * CHUNK + 8 * KIB, 4 * KIB),
    (MIB, MIB),
    (SIZE - 4 * KIB, 4 * KIB),
];
/// Written before the take (so only in the page cache), then overwritten
/// after it: the copy must see the first write.
const DIRTY_AT: u64 = 50 * CHUNK + 512;
/// Chunks the writes copy.
const CHUNKS_COPIED: u64 = 1 + 1 + 16 + 1 + 1;

/// Reports that `test` cannot run: a loud skip locally, a failure in CI.
fn skip(test: &str, why: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{test}: {why}; CI is set, so this fails instead of skipping");
    }
    eprintln!("SKIPPED: {test}: {why}");
}

/// Takes a snapshot of an origin file in `origin_dir` with `storage`, makes
/// the first writes, and checks the image reads the content at the take.
/// Returns the image's figures after the writes.
fn first_writes_keep_the_take(origin_dir: &Path, storage: StorageSpec) -> ImageInfo {
    let path = origin_dir.join("origin.img");
    let mut at_take = Pattern::RandomFill.bytes(1, SIZE);
    fs::write(&path, &at_take).unwrap();
    let engine = Engine::new(small_config()).unwrap();
    let dev = engine.attach_path(&path, Some("origin")).unwrap();
    // Through the origin's file, not flushed: the kernel copy must see it.
    let dirty = Pattern::RandomFill.bytes(2, 4 * KIB);
    dev.write(&dirty, DIRTY_AT).unwrap();
    at_take[DIRTY_AT as usize..][..dirty.len()].copy_from_slice(&dirty);

    let id = snapshot_one(&engine, "origin", storage);
    let image = engine.image("origin").unwrap();
    assert_eq!(image.chunk_size(), CHUNK, "the chunk size the test assumes");
    for (i, &(offset, len)) in WRITES.iter().chain(&[(DIRTY_AT, 4 * KIB)]).enumerate() {
        dev.write(&Pattern::RandomFill.bytes(10 + i as u64, len), offset)
            .unwrap();
    }
    drop(image);
    let info = image_matches_then_destroy(&engine, &id, "origin", &at_take);
    assert_eq!(info.copied_chunks, CHUNKS_COPIED, "chunks copied");
    info
}

#[test]
fn same_filesystem_copies_in_the_kernel() {
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("diff");
    fs::create_dir(&storage).unwrap();
    let info = first_writes_keep_the_take(dir.path(), StorageSpec::Path(storage));
    assert_eq!(
        info.kernel_copied_chunks,
        CHUNKS_COPIED,
        "chunks copied in the kernel (of {CHUNKS_COPIED}) with origin and storage in {}",
        dir.path().display()
    );
}

#[test]
fn storage_on_another_filesystem_copies_through_user_space() {
    let test = "storage_on_another_filesystem_copies_through_user_space";
    let dir = tempfile::tempdir().unwrap();
    let shm = Path::new("/dev/shm");
    let dev_of = |p: &Path| fs::metadata(p).map(|m| m.dev());
    match (dev_of(shm), dev_of(dir.path())) {
        (Ok(a), Ok(b)) if a != b => {}
        (Ok(_), Ok(_)) => {
            return skip(test, "/dev/shm is on the temporary directory's filesystem");
        }
        (Err(e), _) | (_, Err(e)) => return skip(test, &format!("needs /dev/shm ({e})")),
    }
    let storage = tempfile::tempdir_in(shm).unwrap();
    let info =
        first_writes_keep_the_take(dir.path(), StorageSpec::Path(storage.path().to_path_buf()));
    assert_eq!(info.kernel_copied_chunks, 0, "chunks copied in the kernel");
}

/// A filesystem made by `mkfs` (with `args`) in a sparse file, loop-mounted
/// at a directory; unmounted (and the loop device freed) on drop.
struct LoopMount {
    dir: PathBuf,
}

impl LoopMount {
    fn new(mkfs: &str, args: &[&str], image: &Path, dir: &Path) -> Result<Self, String> {
        let run = |cmd: &mut Command| -> Result<(), String> {
            let out = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "{cmd:?}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        };
        // Recent mkfs.xfs refuses filesystems under 300 MiB.
        fs::File::create(image)
            .and_then(|f| f.set_len(512 * MIB))
            .map_err(|e| e.to_string())?;
        run(Command::new(mkfs).args(args).arg(image))?;
        fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(image)
            .arg(dir))?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        match Command::new("umount").arg(&self.dir).output() {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "warning: umount {} failed: {}",
                self.dir.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => eprintln!("warning: cannot run umount: {e}"),
        }
    }
}

/// Runs the first writes on a fresh `mkfs` filesystem with a named storage
/// file there; then takes one more snapshot, copies one chunk and returns
/// `filefrag -v` of the storage file (None without filefrag). `None` of
/// the whole after skipping `test`.
fn on_loop_filesystem(
    test: &str,
    mkfs: &str,
    args: &[&str],
) -> Option<(ImageInfo, Option<String>)> {
    if !is_root() {
        skip(test, "needs root (mount)");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let mount = match LoopMount::new(
        mkfs,
        args,
        &dir.path().join("fs.img"),
        &dir.path().join("mnt"),
    ) {
        Ok(m) => m,
        Err(why) => {
            skip(test, &format!("needs {mkfs} and loop mounts: {why}"));
            return None;
        }
    };
    // A named storage file, so that its extents can be looked at.
    let storage = mount.dir.join("diff.img");
    fs::File::create(&storage).unwrap();
    let info = first_writes_keep_the_take(&mount.dir, StorageSpec::Path(storage.clone()));
    // The destroy gave back what the storage grew: copy one chunk again,
    // with the storage kept by a second snapshot, to look at its extents.
    let engine = Engine::new(small_config()).unwrap();
    let dev = engine
        .attach_path(&mount.dir.join("origin.img"), Some("origin"))
        .unwrap();
    let id = snapshot_one(&engine, "origin", StorageSpec::Path(storage.clone()));
    dev.write(&[7; 4096], 0).unwrap();
    let extents = match Command::new("filefrag").arg("-v").arg(&storage).output() {
        Ok(out) if out.status.success() => Some(String::from_utf8_lossy(&out.stdout).into()),
        _ => {
            eprintln!("{test}: no filefrag: shared extents not checked");
            None
        }
    };
    engine.snapshot_destroy(&id).unwrap();
    Some((info, extents))
}

#[test]
fn btrfs_copies_share_extents() {
    let test = "btrfs_copies_share_extents";
    let Some((info, extents)) = on_loop_filesystem(test, "mkfs.btrfs", &["-q", "-f"]) else {
        return;
    };
    assert_eq!(
        info.kernel_copied_chunks, CHUNKS_COPIED,
        "chunks copied in the kernel"
    );
    if let Some(text) = extents {
        assert!(
            text.contains("shared"),
            "no shared extent in the storage after a reflink copy:\n{text}"
        );
    }
}

#[test]
fn xfs_copies_through_user_space() {
    let test = "xfs_copies_through_user_space";
    let Some((info, extents)) =
        on_loop_filesystem(test, "mkfs.xfs", &["-q", "-f", "-m", "reflink=1"])
    else {
        return;
    };
    assert_eq!(info.kernel_copied_chunks, 0, "chunks copied in the kernel");
    if let Some(text) = extents {
        assert!(
            !text.contains("shared"),
            "a shared extent in the storage, but xfs copies go through user space:\n{text}"
        );
    }
}
