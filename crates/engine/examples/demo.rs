//! End-to-end demo of the engine on image files in a temporary directory:
//! two devices, a snapshot of both, writes after the take, images verified
//! against the content at the take, and the changed blocks read from CBT.
//! Exits non-zero if anything does not match. Run: `scripts/demo`.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::ExitCode;

use blksnap_engine::{Config, Engine, SnapshotOptions, StorageSpec, TrackedDevice};

const MIB: u64 = 1 << 20;
const IO: u64 = 4096;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

fn random_writes(
    device: &TrackedDevice,
    rng: &mut fastrand::Rng,
    count: usize,
) -> Result<BTreeSet<u64>, String> {
    let mut offsets = BTreeSet::new();
    for _ in 0..count {
        let offset = rng.u64(0..device.size() / IO) * IO;
        let data: Vec<u8> = (0..IO).map(|_| rng.u8(..)).collect();
        device.write(&data, offset).map_err(|e| e.to_string())?;
        offsets.insert(offset);
    }
    Ok(offsets)
}

fn read_whole(
    read: impl Fn(&mut [u8], u64) -> blksnap_engine::Result<()>,
    size: u64,
) -> Result<Vec<u8>, String> {
    let mut buf = vec![0; size as usize];
    read(&mut buf, 0).map_err(|e| e.to_string())?;
    Ok(buf)
}

fn ranges(blocks: &[u64]) -> String {
    let mut out = Vec::new();
    let mut i = 0;
    while i < blocks.len() {
        let start = blocks[i];
        while i + 1 < blocks.len() && blocks[i + 1] == blocks[i] + 1 {
            i += 1;
        }
        out.push(if blocks[i] == start {
            format!("{start}")
        } else {
            format!("{start}-{}", blocks[i])
        });
        i += 1;
    }
    out.join(",")
}

fn run() -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    println!("blksnap engine demo in {}", dir.path().display());
    let engine = Engine::new(Config {
        diff_storage_minimum: 64 * MIB,
        ..Config::default()
    })
    .map_err(|e| e.to_string())?;
    let mut rng = fastrand::Rng::with_seed(2026);

    let mut devices = Vec::new();
    for (name, size) in [("disk0", 64 * MIB), ("disk1", 32 * MIB)] {
        let path = dir.path().join(format!("{name}.img"));
        make_image(&path, size, &mut rng)?;
        let device = engine
            .attach_path(&path, Some(name))
            .map_err(|e| e.to_string())?;
        let info = device.change_tracker().info();
        println!(
            "attached {name}: {} MiB image {}, tracking block {} KiB, generation {}",
            size / MIB,
            path.display(),
            info.block_size / 1024,
            info.generation_id
        );
        devices.push(device);
    }

    for d in &devices {
        random_writes(d, &mut rng, 200)?;
    }
    println!("wrote 200 random 4 KiB blocks to each device");

    let storage_dir = dir.path().join("diff");
    std::fs::create_dir(&storage_dir).map_err(|e| e.to_string())?;
    let first = snapshot(&engine, &storage_dir)?;
    println!(
        "snapshot {first} taken of disk0 and disk1 (difference storage: temporary file in {})",
        storage_dir.display()
    );
    let at_take: Vec<Vec<u8>> = devices
        .iter()
        .map(|d| read_whole(|b, o| d.read(b, o), d.size()))
        .collect::<Result<_, _>>()?;

    let mut written = Vec::new();
    for d in &devices {
        written.push(random_writes(d, &mut rng, 40)?);
    }
    println!("wrote 40 more random 4 KiB blocks to each device while the snapshot is held");

    for (d, expected) in devices.iter().zip(&at_take) {
        let image = engine.image(d.name()).map_err(|e| e.to_string())?;
        let content = read_whole(|b, o| image.read(b, o), image.size())?;
        if &content != expected {
            return Err(format!(
                "image of {} differs from the device at the take",
                d.name()
            ));
        }
        let now = read_whole(|b, o| d.read(b, o), d.size())?;
        let differing = now
            .chunks(image.chunk_size() as usize)
            .zip(content.chunks(image.chunk_size() as usize))
            .filter(|(a, b)| a != b)
            .count();
        println!(
            "image of {}: verified, identical to the device at the take ({} MiB; {differing} chunks of {} KiB differ from the live device)",
            d.name(),
            image.size() / MIB,
            image.chunk_size() / 1024
        );
    }
    let stats = engine
        .snapshot_info(&first)
        .map_err(|e| e.to_string())?
        .storage;
    println!(
        "difference storage: {} KiB used of {} KiB",
        stats.used / 1024,
        stats.total / 1024
    );
    engine.snapshot_destroy(&first).map_err(|e| e.to_string())?;

    // The incremental backup after `first`: blocks whose byte > its number.
    let second = snapshot(&engine, &storage_dir)?;
    println!("snapshot {second} taken; changed blocks since snapshot {first}:");
    for (d, offsets) in devices.iter().zip(&written) {
        let info = d.change_tracker().info();
        let map = engine.read_cbt_map(d.name()).map_err(|e| e.to_string())?;
        let since = info.changes_number - 1;
        let changed: Vec<u64> = map
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > since)
            .map(|(b, _)| b as u64)
            .collect();
        let expected: Vec<u64> = offsets
            .iter()
            .map(|o| o / info.block_size as u64)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        println!(
            "  {}: {} of {} blocks of {} KiB changed (changes_number {}): {}",
            d.name(),
            changed.len(),
            info.block_count,
            info.block_size / 1024,
            info.changes_number,
            ranges(&changed)
        );
        if changed != expected {
            return Err(format!(
                "CBT of {} does not match the blocks written",
                d.name()
            ));
        }
    }
    println!("the change maps match exactly the blocks written after the first snapshot");
    engine
        .snapshot_destroy(&second)
        .map_err(|e| e.to_string())?;
    for d in &devices {
        engine.detach(d.name()).map_err(|e| e.to_string())?;
    }
    println!("snapshots destroyed, devices detached, temporary directory removed: demo OK");
    Ok(())
}

fn snapshot(engine: &Engine, storage: &Path) -> Result<uuid::Uuid, String> {
    let id = engine
        .snapshot_create(
            StorageSpec::Path(storage.to_path_buf()),
            SnapshotOptions {
                limit: Some(256 * MIB),
                ..Default::default()
            },
        )
        .map_err(|e| e.to_string())?;
    for name in ["disk0", "disk1"] {
        engine.snapshot_add(&id, name).map_err(|e| e.to_string())?;
    }
    engine.snapshot_take(&id).map_err(|e| e.to_string())?;
    Ok(id)
}

fn make_image(path: &Path, size: u64, rng: &mut fastrand::Rng) -> Result<(), String> {
    let data: Vec<u8> = (0..size).map(|_| rng.u8(..)).collect();
    std::fs::write(path, data).map_err(|e| e.to_string())
}
