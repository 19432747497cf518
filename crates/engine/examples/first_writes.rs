//! First-write cost through the engine on real files, for comparing how
//! chunks are copied (docs/performance.md, "How a first write copies"):
//!
//! ```sh
//! cargo run --release -p blksnap-engine --example first_writes -- ORIGIN_DIR STORAGE_DIR [ROUNDS]
//! ```
//!
//! A 128 MiB origin file in ORIGIN_DIR, the difference storage an unnamed
//! file in STORAGE_DIR, 256 KiB chunks. Each round takes a snapshot three
//! times: one 4 KiB write per chunk (every one the first to its chunk), 1 MiB
//! sequential writes over the origin (each copies 4 chunks), and 4 KiB
//! rewrites of chunks already copied. Prints the median of the rounds. With
//! `COLD` set, the origin leaves the page cache before each take and each
//! timing ends with a `syncfs`, so writeback counts too.

use std::sync::Arc;
use std::time::Instant;

use blksnap_engine::{BlockDevice, Config, Engine, FileDevice, SnapshotOptions, StorageSpec};

const SIZE: u64 = 128 << 20;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [origin_dir, storage_dir, rest @ ..] = &args[..] else {
        eprintln!("usage: first_writes ORIGIN_DIR STORAGE_DIR [ROUNDS]");
        std::process::exit(2);
    };
    let rounds: usize = rest.first().map_or(4, |r| r.parse().expect("ROUNDS"));
    let cold = std::env::var_os("COLD").is_some();
    let path =
        std::path::Path::new(origin_dir).join(format!("first-writes-{}.img", std::process::id()));
    let data: Vec<u8> = (0..SIZE)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&path, &data).expect("write the origin file");
    drop(data);

    let engine = Engine::new(Config::default()).expect("engine");
    let origin: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(&path).expect("open the origin"));
    let dev = engine.attach("origin", origin).expect("attach");
    let (small, large) = (vec![7u8; 4096], vec![9u8; 1 << 20]);
    let mut figures: [Vec<f64>; 3] = Default::default();
    for _ in 0..rounds {
        for (job, figure) in figures.iter_mut().enumerate() {
            let file = std::fs::File::open(&path).expect("open the origin");
            file.sync_all().expect("fsync the origin");
            if cold {
                rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed).expect("fadvise");
            }
            let storage = StorageSpec::Path(storage_dir.into());
            let id = engine
                .snapshot_create(storage, SnapshotOptions::default())
                .expect("create");
            engine.snapshot_add(&id, "origin").expect("add");
            engine.snapshot_take(&id).expect("take");
            let chunk = engine.image("origin").expect("image").chunk_size();
            let chunks = SIZE / chunk;
            if job == 2 {
                for c in 0..chunks {
                    dev.write(&small, c * chunk).expect("write");
                }
            }
            let start = Instant::now();
            // (buffer, offset of the first write, step, writes)
            let (buf, first, step, count) = match job {
                0 => (&small, 0, chunk, chunks),
                1 => (&large, 0, 1 << 20, SIZE >> 20),
                _ => (&small, 8192, chunk, chunks),
            };
            for i in 0..count {
                dev.write(buf, first + i * step).expect("write");
            }
            if cold {
                rustix::fs::syncfs(&file).expect("syncfs");
            }
            figure.push(count as f64 / start.elapsed().as_secs_f64());
            let info = engine.snapshot_info(&id).expect("info");
            assert_eq!(info.images[0].error_code, 0, "the image was corrupted");
            engine.snapshot_destroy(&id).expect("destroy");
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let [c4k, c1m, rewrite] = &mut figures;
    println!(
        "first 4 KiB writes {:.0} IOPS, first 1 MiB writes {:.0} MiB/s, 4 KiB rewrites {:.0} IOPS",
        median(c4k),
        median(c1m),
        median(rewrite)
    );
    drop(dev);
    std::fs::remove_file(&path).expect("remove the origin file");
}
