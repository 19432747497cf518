//! Issue 13, item 3: a thousand clients at once. Each connection costs the
//! server one thread while it is idle or asks one thing at a time; the
//! threads that run pipelined requests are capped over the whole server
//! (`NbdLimits::max_worker_threads`) and end when idle; and every one of
//! the thousand connections is served, its data read back.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use blksnap_engine::device::MemDevice;
use blksnap_engine::{Config, Engine};
use blksnap_nbd::{NbdAddress, NbdClient, NbdLimits, NbdServer};
use blksnap_test_support::Pattern;

const CONNECTIONS: usize = 1000;
const BLOCK: usize = 4096;
/// Client threads sharing the connections out.
const DRIVERS: usize = 8;

/// Threads of this process, the server's among them.
fn threads() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Threads:")).unwrap();
    line[8..].trim().parse().unwrap()
}

/// Room for the descriptors: each connection has one on the client side
/// and a few on the server's.
fn raise_descriptor_limit(need: u64) {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let hard = limit.maximum;
    assert!(
        hard.is_none_or(|h| h >= need),
        "the descriptor limit {hard:?} is below the {need} this test needs"
    );
    let current = limit.current.unwrap_or(u64::MAX);
    if current < need {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(need),
                maximum: hard,
            },
        )
        .unwrap();
    }
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not after {limit:?}");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_thousand_connections_cost_a_thread_each_and_are_all_served() {
    raise_descriptor_limit(6 * CONNECTIONS as u64);
    let dir = tempfile::tempdir().unwrap();
    let engine = Arc::new(Engine::new(Config::default()).unwrap());
    let size = (CONNECTIONS * BLOCK) as u64;
    engine
        .attach("disk", Arc::new(MemDevice::new(size)))
        .unwrap();
    let limits = NbdLimits {
        max_worker_threads: 64,
        ..NbdLimits::default()
    };
    let server = NbdServer::with_limits(engine, limits);
    let socket = dir.path().join("nbd.sock");
    server.listen_unix(&socket).unwrap();
    let address = NbdAddress::Unix {
        socket,
        export: "disk".into(),
    };
    let base = threads();

    let mut clients: Vec<NbdClient> = (0..CONNECTIONS)
        .map(|i| {
            NbdClient::connect_timeout(&address, &[], Some(Duration::from_secs(30)))
                .unwrap_or_else(|e| panic!("connection {i}: {e}"))
        })
        .collect();
    wait_for("every connection counted", Duration::from_secs(10), || {
        server.connection_count() == CONNECTIONS
    });
    let idle = threads() - base;
    assert!(
        idle <= CONNECTIONS + 2,
        "{idle} server threads for {CONNECTIONS} idle connections"
    );

    // Every connection writes its own block and reads it back, DRIVERS
    // connections at a time, while the thread count is watched.
    let peak = Arc::new(AtomicUsize::new(0));
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = {
        let (peak, watching) = (peak.clone(), watching.clone());
        thread::spawn(move || {
            while watching.load(Ordering::Relaxed) {
                peak.fetch_max(threads(), Ordering::Relaxed);
                thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let per_driver = CONNECTIONS / DRIVERS;
    let mut handed_out = Vec::new();
    for _ in 0..DRIVERS {
        let mine: Vec<NbdClient> = clients.drain(..per_driver).collect();
        handed_out.push(mine);
    }
    let drivers: Vec<_> = handed_out
        .into_iter()
        .enumerate()
        .map(|(d, mut mine)| {
            thread::spawn(move || {
                for (k, c) in mine.iter_mut().enumerate() {
                    let i = d * per_driver + k;
                    let data = Pattern::XorShift.bytes(i as u64, BLOCK as u64);
                    c.write_at(&data, (i * BLOCK) as u64).unwrap();
                    let mut back = vec![0u8; BLOCK];
                    c.read_at(&mut back, (i * BLOCK) as u64).unwrap();
                    assert!(back == data, "connection {i} read back other data");
                }
                mine
            })
        })
        .collect();
    let mut clients: Vec<NbdClient> = drivers
        .into_iter()
        .flat_map(|d| d.join().unwrap())
        .collect();
    watching.store(false, Ordering::Relaxed);
    watcher.join().unwrap();
    let busy = peak.load(Ordering::Relaxed) - base;
    eprintln!("threads over the base: {idle} with {CONNECTIONS} idle connections, {busy} at the peak of I/O");
    // The connections' own threads, the capped workers, and this test's
    // drivers and watcher.
    assert!(
        busy <= CONNECTIONS + limits.max_worker_threads + DRIVERS + 2,
        "{busy} threads at the peak, over {CONNECTIONS} connections + {} workers",
        limits.max_worker_threads
    );

    // Every block, read again through one connection, is its own.
    let mut all = vec![0u8; size as usize];
    clients[0].read_at(&mut all, 0).unwrap();
    for (i, block) in all.chunks(BLOCK).enumerate() {
        assert!(
            block == Pattern::XorShift.bytes(i as u64, BLOCK as u64),
            "block {i} is not what connection {i} wrote"
        );
    }
    // Idle workers end; closed connections give their threads back.
    wait_for("idle workers ended", Duration::from_secs(20), || {
        threads() - base <= CONNECTIONS + 2
    });
    clients.clear();
    wait_for("every connection closed", Duration::from_secs(20), || {
        server.connection_count() == 0
    });
    wait_for("connection threads ended", Duration::from_secs(20), || {
        threads() <= base + 2
    });
    server.shutdown();
}
