//! Memory the engine holds per TiB of tracked capacity.
//!
//! Attaches a null device of N GiB (first argument, default 64), takes a
//! snapshot of it with a null difference storage of 2×N GiB, touches every
//! chunk once so every chunk is copied, and prints the chunk geometry,
//! `Engine::footprint()` and the growth of the process's resident memory
//! (VmRSS), each also scaled linearly to one TiB. Then does the same for a
//! 1 TiB device that is only tracked (no snapshot).
//!
//! Run: `cargo run --release -p blksnap-engine --example footprint [GiB]`

use std::error::Error;
use std::io;
use std::sync::Arc;
use std::time::Instant;

use blksnap_engine::{BlockDevice, Config, Engine, SnapshotOptions, StorageSpec};

const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

/// A device of a given size that reads zeroes and forgets what is written.
#[derive(Debug)]
struct NullDevice {
    size: u64,
}

impl NullDevice {
    fn new(size: u64) -> Self {
        Self { size }
    }
}

impl BlockDevice for NullDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], _offset: u64) -> io::Result<()> {
        buf.fill(0);
        Ok(())
    }

    fn write_at(&self, _buf: &[u8], _offset: u64) -> io::Result<()> {
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn discard(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }

    fn write_zeroes(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
}

/// Resident memory of this process, in bytes (VmRSS of /proc/self/status).
fn vm_rss() -> Result<u64, Box<dyn Error>> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or("no VmRSS line in /proc/self/status")?;
    let kib: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kib * 1024)
}

fn mib(bytes: f64) -> String {
    format!("{:.2} MiB", bytes / (1u64 << 20) as f64)
}

/// Prints a figure measured on `capacity` bytes and its linear extrapolation
/// to one TiB.
fn report(what: &str, bytes: i64, capacity: u64) {
    let per_tib = bytes as f64 * (TIB as f64 / capacity as f64);
    println!(
        "  {what:<26} {bytes:>12} bytes ({:>11})  -> {:>14.0} bytes/TiB ({})",
        mib(bytes as f64),
        per_tib,
        mib(per_tib)
    );
}

fn main() -> Result<(), Box<dyn Error>> {
    let gib: u64 = match std::env::args().nth(1) {
        Some(arg) => arg
            .parse()
            .map_err(|e| format!("capacity in GiB expected, got {arg:?}: {e}"))?,
        None => 64,
    };
    if gib == 0 {
        return Err("capacity must be at least 1 GiB".into());
    }
    let capacity = gib * GIB;

    // --- Snapshot with every chunk copied -------------------------------
    let engine = Engine::new(Config::default())?;
    let rss_before = vm_rss()?;
    let started = Instant::now();
    let tracked = engine.attach("null", Arc::new(NullDevice::new(capacity)))?;
    let storage = StorageSpec::Device(Arc::new(NullDevice::new(2 * capacity)));
    let id = engine.snapshot_create(storage, SnapshotOptions::default())?;
    engine.snapshot_add(&id, "null")?;
    engine.snapshot_take(&id)?;
    let image = engine.image("null")?;
    let chunk_size = image.chunk_size();
    let chunks = capacity.div_ceil(chunk_size);
    for chunk in 0..chunks {
        tracked.discard(chunk * chunk_size, 512)?;
    }
    if image.error_code() != 0 {
        return Err(format!("snapshot image corrupted (errno {})", image.error_code()).into());
    }
    let stats = engine.snapshot_info(&id)?.storage;
    if stats.used < capacity {
        return Err(format!(
            "only {} of {capacity} bytes were copied: not every chunk was copied",
            stats.used
        )
        .into());
    }
    let footprint = engine.footprint();
    let rss_after = vm_rss()?;
    let cbt = engine.cbt_info("null")?;
    let cbt_bytes = 2 * cbt.block_count as i64;

    println!(
        "snapshot of a {gib} GiB device, every chunk copied ({:.1} s):",
        started.elapsed().as_secs_f64()
    );
    println!("  chunk size                 {chunk_size} bytes");
    println!("  chunk count                {chunks}");
    println!(
        "  tracking block             {} bytes × {} blocks",
        cbt.block_size, cbt.block_count
    );
    println!(
        "  difference storage used    {} bytes of {}",
        stats.used, stats.total
    );
    report("footprint()", footprint as i64, capacity);
    report("  of which CBT maps", cbt_bytes, capacity);
    report(
        "  of which chunk map",
        footprint as i64 - cbt_bytes,
        capacity,
    );
    report(
        "VmRSS delta",
        rss_after as i64 - rss_before as i64,
        capacity,
    );
    if capacity != TIB {
        let tib_shift = Config::default().tracking_block_shift(TIB);
        println!(
            "  (linear extrapolation; at 1 TiB the tracking block is {} bytes, so the CBT maps \
             are {} bytes, not scaled from {gib} GiB)",
            1u64 << tib_shift,
            2 * (TIB >> tib_shift)
        );
    }

    // --- Change tracking only, 1 TiB -------------------------------------
    // The first engine stays alive so its memory does not return to the
    // allocator and blur this delta.
    let cbt_engine = Engine::new(Config::default())?;
    let rss_before = vm_rss()?;
    let tracked = cbt_engine.attach("null-1t", Arc::new(NullDevice::new(TIB)))?;
    let footprint = cbt_engine.footprint();
    let rss_attached = vm_rss()?;
    let cbt = cbt_engine.cbt_info("null-1t")?;
    // The maps are zeroed allocations: their pages become resident only
    // when written. Write every tracking block once to see the live map's.
    let block = cbt.block_size as u64;
    for b in 0..cbt.block_count {
        tracked.discard(b * block, 512)?;
    }
    let rss_touched = vm_rss()?;
    println!("change tracking only, 1 TiB device, no snapshot:");
    println!(
        "  tracking block             {} bytes × {} blocks",
        cbt.block_size, cbt.block_count
    );
    report("footprint()", footprint as i64, TIB);
    report(
        "VmRSS delta, attached",
        rss_attached as i64 - rss_before as i64,
        TIB,
    );
    report(
        "VmRSS delta, all written",
        rss_touched as i64 - rss_before as i64,
        TIB,
    );
    println!("  (the readable map, the other half of footprint(), is resident after a take)");

    engine.snapshot_destroy(&id)?;
    Ok(())
}
