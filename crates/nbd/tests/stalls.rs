//! Issue 13, item 3: clients that stall. A client that announces a 32 MiB
//! write and stops halfway, one that stops inside a request header, and one
//! that stops reading its replies are each closed after the stall timeout,
//! and what they held (payload budget, workers) is given back; a client
//! that is merely idle between requests is not closed, and the others are
//! served throughout. Many idle handshakes are closed by the handshake
//! timeout.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use blksnap_engine::device::MemDevice;
use blksnap_engine::{Config, Engine};
use blksnap_nbd::protocol::*;
use blksnap_nbd::{NbdAddress, NbdClient, NbdLimits, NbdServer};

const MIB: u64 = 1 << 20;
const STALL: Duration = Duration::from_millis(400);

fn server(dir: &Path) -> (Arc<NbdServer>, NbdAddress) {
    let engine = Arc::new(Engine::new(Config::default()).unwrap());
    engine
        .attach("disk", Arc::new(MemDevice::new(64 * MIB)))
        .unwrap();
    let limits = NbdLimits {
        stall_timeout: Some(STALL),
        handshake_timeout: Some(STALL),
        ..NbdLimits::default()
    };
    let server = NbdServer::with_limits(engine, limits);
    let socket = dir.join("nbd.sock");
    server.listen_unix(&socket).unwrap();
    let address = NbdAddress::Unix {
        socket,
        export: "disk".into(),
    };
    (server, address)
}

/// A raw connection through NBD_OPT_GO (no structured replies).
fn raw(address: &NbdAddress) -> UnixStream {
    let NbdAddress::Unix { socket, .. } = address else {
        unreachable!()
    };
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).unwrap();
    s.write_all(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes())
        .unwrap();
    let mut go = IHAVEOPT.to_be_bytes().to_vec();
    go.extend_from_slice(&OPT_GO.to_be_bytes());
    go.extend_from_slice(&(4 + 4 + 2u32).to_be_bytes());
    go.extend_from_slice(&4u32.to_be_bytes());
    go.extend_from_slice(b"disk");
    go.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&go).unwrap();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).unwrap();
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let mut p = vec![0; u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize];
        s.read_exact(&mut p).unwrap();
        if kind == REP_ACK {
            return s;
        }
        assert_eq!(kind, REP_INFO);
    }
}

fn request(command: u16, cookie: u64, offset: u64, length: u64) -> [u8; REQUEST_LEN] {
    Request {
        flags: 0,
        command,
        cookie,
        offset,
        length,
    }
    .encode()
}

/// Waits until the server closed `s` (end of stream or reset), within
/// `limit`; returns how long it took.
fn closed_within(s: &mut UnixStream, limit: Duration, what: &str) -> Duration {
    let started = Instant::now();
    s.set_read_timeout(Some(limit)).unwrap();
    let mut sink = vec![0u8; 1 << 20];
    loop {
        match s.read(&mut sink) {
            Ok(0) => return started.elapsed(),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return started.elapsed(),
            Err(e) => panic!("{what}: not closed within {limit:?} ({e})"),
        }
    }
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn stalled_clients_are_closed_and_idle_ones_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let (server, address) = server(dir.path());
    let mut survivor = NbdClient::connect(&address, &[]).unwrap();

    // Half of a 32 MiB write, then nothing: held, then closed, and the
    // budget it took is given back.
    let mut half_write = raw(&address);
    half_write
        .write_all(&request(CMD_WRITE, 1, 0, 32 * MIB))
        .unwrap();
    half_write.write_all(&vec![0x5a; MIB as usize]).unwrap();
    wait_for("the half write's budget not taken", || {
        server.queued_write_bytes() == 32 * MIB
    });
    // Half a header.
    let mut half_header = raw(&address);
    half_header
        .write_all(&request(CMD_READ, 2, 0, 4096)[..10])
        .unwrap();
    // Pipelined 32 MiB reads whose replies are never read: the server's
    // reply writes block, then time out.
    let mut deaf = raw(&address);
    for cookie in 0..16 {
        deaf.write_all(&request(CMD_READ, cookie, 0, 32 * MIB))
            .unwrap();
    }
    // Idle after the handshake, for four stall timeouts: not a stall.
    let mut idle = NbdClient::connect(&address, &[]).unwrap();

    let took = closed_within(&mut half_write, 10 * STALL, "a client stalled mid-write");
    assert!(took < 10 * STALL, "{took:?}");
    closed_within(&mut half_header, 10 * STALL, "a client stalled mid-header");
    wait_for("the stalled write's budget is still held", || {
        server.queued_write_bytes() == 0
    });
    thread::sleep(4 * STALL);
    wait_for(
        "a client not reading its replies still holds workers",
        || server.worker_threads() == 0 || server.connection_count() <= 2,
    );
    wait_for("the deaf client is still connected", || {
        server.connection_count() == 2
    });
    drop(deaf);

    let mut buf = vec![0u8; 4096];
    idle.read_at(&mut buf, 0).unwrap();
    survivor.write_at(&[7u8; 4096], 8192).unwrap();
    survivor.read_at(&mut buf, 8192).unwrap();
    assert_eq!(buf, vec![7u8; 4096]);
    server.shutdown();
}

/// Many connections that never finish their handshake are all closed by
/// the handshake timeout, and a real client is served meanwhile.
#[test]
fn many_idle_handshakes_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let (server, address) = server(dir.path());
    let NbdAddress::Unix { socket, .. } = &address else {
        unreachable!()
    };
    let mut idle: Vec<UnixStream> = (0..200)
        .map(|_| UnixStream::connect(socket).unwrap())
        .collect();
    let mut c = NbdClient::connect(&address, &[]).unwrap();
    let mut buf = vec![0u8; 512];
    c.read_at(&mut buf, 0).unwrap();
    for (i, s) in idle.iter_mut().enumerate() {
        closed_within(s, 20 * STALL, &format!("idle handshake {i}"));
    }
    wait_for("idle handshakes still counted", || {
        server.connection_count() == 1
    });
    c.read_at(&mut buf, 0).unwrap();
    server.shutdown();
}
