//! The NBD client (`blksnap_nbd::client`) against our real server (an
//! engine and an `NbdServer` in this process, on a Unix socket in a
//! temporary directory and on TCP 127.0.0.1:0), against a scripted server
//! that breaks the protocol on purpose, and against nbdkit (skipped with a
//! loud message when nbdkit is missing, unless CI=true).

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use blksnap_engine::{
    BlockDevice, Config, Engine, Extent, MemDevice, SnapshotOptions, StorageSpec,
};
use blksnap_nbd::protocol::*;
use blksnap_nbd::{unix_uri, NbdAddress, NbdClient, NbdServer};
use blksnap_test_support::Pattern;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const DISK: &str = "disk";
const IMAGE: &str = "snapshot/disk";
const TIMEOUT: Duration = Duration::from_secs(20);
const ALLOC: &str = "base:allocation";
const HOLE: u32 = STATE_HOLE | STATE_ZERO;

// ---------------------------------------------------------------------------
// A device with holes: a memory device whose extents say which units of
// `unit` bytes (counted from 0) read as zeroes.

#[derive(Debug)]
struct SparseDevice {
    inner: MemDevice,
    unit: u64,
}

impl BlockDevice for SparseDevice {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.write_zeroes(offset, len)
    }
    fn extents(&self, offset: u64, len: u64) -> io::Result<Vec<Extent>> {
        let mut data = vec![0u8; len as usize];
        self.inner.read_at(&mut data, offset)?;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < offset + len {
            let end = ((pos / self.unit + 1) * self.unit).min(offset + len);
            let piece = &data[(pos - offset) as usize..(end - offset) as usize];
            let zero = piece.iter().all(|&b| b == 0);
            match out.last_mut() {
                Some(last) if last.zero == zero => last.len += end - pos,
                _ => out.push(Extent {
                    len: end - pos,
                    zero,
                }),
            }
            pos = end;
        }
        Ok(out)
    }
}

// ---------------------------------------------------------------------------
// Our server.

struct Fixture {
    dir: tempfile::TempDir,
    socket: PathBuf,
    tcp_port: u16,
    engine: Arc<Engine>,
    server: Arc<NbdServer>,
}

impl Fixture {
    /// An engine tracking `disk` (attached as `disk`), served on a Unix
    /// socket and on TCP.
    fn new(disk: Arc<dyn BlockDevice>) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let engine = Arc::new(Engine::new(Config::default()).unwrap());
        engine.attach(DISK, disk).unwrap();
        let server = NbdServer::new(engine.clone());
        let socket = dir.path().join("nbd.sock");
        server.listen_unix(&socket).unwrap();
        let (tcp, _) = server.listen_tcp("127.0.0.1:0").unwrap();
        Fixture {
            dir,
            socket,
            tcp_port: tcp.port(),
            engine,
            server,
        }
    }

    /// A memory disk of `size` bytes holding `content` (zero-padded).
    fn with_content(size: u64, content: &[u8]) -> (Fixture, Arc<MemDevice>) {
        let disk = Arc::new(MemDevice::new(size));
        disk.write_at(content, 0).unwrap();
        (Fixture::new(disk.clone()), disk)
    }

    fn unix(&self, export: &str) -> NbdAddress {
        NbdAddress::Unix {
            socket: self.socket.clone(),
            export: export.into(),
        }
    }

    fn tcp(&self, export: &str) -> NbdAddress {
        NbdAddress::Tcp {
            host: "127.0.0.1".into(),
            port: self.tcp_port,
            export: export.into(),
        }
    }

    fn open(&self, export: &str, contexts: &[&str]) -> NbdClient {
        NbdClient::connect_timeout(&self.unix(export), contexts, Some(TIMEOUT))
            .unwrap_or_else(|e| panic!("connect to {export} with {contexts:?}: {e}"))
    }

    /// Takes a snapshot of the disk with 64 MiB of memory storage.
    fn take(&self) {
        let storage = StorageSpec::Device(Arc::new(MemDevice::new(64 * MIB)));
        let id = self
            .engine
            .snapshot_create(storage, SnapshotOptions::default())
            .unwrap();
        self.engine.snapshot_add(&id, DISK).unwrap();
        self.engine.snapshot_take(&id).unwrap();
    }

    fn destroy_snapshot(&self) {
        let id = self.engine.snapshot_of(DISK).unwrap().expect("a snapshot");
        self.engine.snapshot_destroy(&id).unwrap();
    }

    fn wait_connections(&self, n: usize) {
        let start = Instant::now();
        while self.server.connection_count() != n {
            assert!(
                start.elapsed() < TIMEOUT,
                "the server still has {} connections, expected {n}",
                self.server.connection_count()
            );
            thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.server.shutdown();
    }
}

fn read(c: &mut NbdClient, offset: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0xa5u8; len as usize];
    c.read_at(&mut buf, offset)
        .unwrap_or_else(|e| panic!("read {offset}+{len}: {e}"));
    buf
}

/// Compares without printing megabytes.
fn assert_same(got: &[u8], want: &[u8], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {i}: got {:#04x}, want {:#04x}",
            got[i], want[i]
        );
    }
}

// ---------------------------------------------------------------------------
// Reads and writes.

#[test]
fn device_reads_match_over_unix_and_tcp_including_reads_over_max_payload() {
    // 40 MiB of data with 3 MiB of zeroes at 8 MiB (sent as hole chunks).
    let size = 40 * MIB;
    let mut content = Pattern::RandomFill.bytes(1, size);
    content[(8 * MIB) as usize..(11 * MIB) as usize].fill(0);
    let (fx, _disk) = Fixture::with_content(size, &content);
    let uri = unix_uri(&fx.socket, DISK);
    let tcp_uri = format!("nbd://127.0.0.1:{}/{DISK}", fx.tcp_port);
    for address in [
        NbdAddress::parse(&uri).unwrap(),
        NbdAddress::parse(&tcp_uri).unwrap(),
    ] {
        let mut c = NbdClient::connect_timeout(&address, &[], Some(TIMEOUT)).unwrap();
        assert_eq!(c.size(), size);
        assert!(!c.read_only());
        assert!(c.structured_replies());
        assert_eq!(c.max_payload(), MAX_PAYLOAD);
        let (min, preferred, max) = c.block_size().expect("our server sends block sizes");
        assert_eq!((min, max), (1, MAX_PAYLOAD));
        assert!(preferred >= 4096);
        for (at, n) in [
            (0, 4096),
            (12345, 1),
            (7 * MIB + 3, 200 * KIB),
            (size - 10, 10),
        ] {
            assert_same(
                &read(&mut c, at, n),
                &content[at as usize..(at + n) as usize],
                &format!("{address} at {at}+{n}"),
            );
        }
        // The whole device in one call: two requests (32 MiB + 8 MiB).
        assert_same(
            &read(&mut c, 0, size),
            &content,
            &format!("{address} whole"),
        );
        // Unaligned and over the maximum, across the zeroes.
        let (at, n) = (5 * MIB + 1, u64::from(MAX_PAYLOAD) + 2 * MIB + 5);
        assert_same(
            &read(&mut c, at, n),
            &content[at as usize..(at + n) as usize],
            &format!("{address} at {at}+{n}"),
        );
        // Empty reads do nothing.
        c.read_at(&mut [], size + 100).unwrap();
        c.disconnect().unwrap();
    }
    fx.wait_connections(0);
}

#[test]
fn writes_read_back_including_writes_over_max_payload() {
    let size = 40 * MIB;
    let (fx, disk) = Fixture::with_content(size, &[]);
    let mut w = fx.open(DISK, &[]);
    let big = Pattern::RandomFill.bytes(2, u64::from(MAX_PAYLOAD) + MIB + 7);
    let big_at = MIB + 7;
    w.write_at(&big, big_at).unwrap();
    let small = Pattern::XorShift.bytes(3, 1000);
    w.write_at(&small, size - 1000).unwrap();
    w.write_at(&[], 0).unwrap();
    w.flush().unwrap();

    let mut expected = vec![0u8; size as usize];
    expected[big_at as usize..big_at as usize + big.len()].copy_from_slice(&big);
    expected[(size - 1000) as usize..].copy_from_slice(&small);
    assert_same(&disk.contents(), &expected, "the device after the writes");
    // Another connection, over TCP, reads them back.
    let mut r = NbdClient::connect_timeout(&fx.tcp(DISK), &[], Some(TIMEOUT)).unwrap();
    assert_same(&read(&mut r, 0, size), &expected, "read back over TCP");
    // And the writer itself.
    assert_same(&read(&mut w, size - 1000, 1000), &small, "read back");
    w.disconnect().unwrap();
    r.disconnect().unwrap();
    fx.wait_connections(0);
}

#[test]
fn image_reads_the_content_at_take_while_the_origin_changes() {
    let size = 16 * MIB;
    let content = Pattern::RandomFill.bytes(4, size);
    let (fx, disk) = Fixture::with_content(size, &content);
    fx.take();
    let mut image = fx.open(IMAGE, &[]);
    assert_eq!(image.size(), size);

    // A writer changes the origin all the time the image is read.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, address) = (stop.clone(), fx.unix(DISK));
        thread::spawn(move || {
            let mut dev = NbdClient::connect_timeout(&address, &[], Some(TIMEOUT)).unwrap();
            let mut rng = 1u64;
            let mut writes = 0;
            while !stop.load(Ordering::SeqCst) || writes < 20 {
                rng = rng
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let at = (rng >> 20) % (size - 300 * KIB);
                dev.write_at(&Pattern::XorShift.bytes(rng, 300 * KIB), at)
                    .unwrap();
                writes += 1;
            }
            dev.disconnect().unwrap();
            writes
        })
    };
    for round in 0..3 {
        assert_same(
            &read(&mut image, 0, size),
            &content,
            &format!("image read {round}"),
        );
    }
    stop.store(true, Ordering::SeqCst);
    let writes = writer.join().unwrap();
    assert!(writes >= 20);
    assert_ne!(disk.contents(), content, "the origin did change");
    assert_same(
        &read(&mut image, 0, size),
        &content,
        "image read at the end",
    );
    image.disconnect().unwrap();
    fx.wait_connections(0);
}

// ---------------------------------------------------------------------------
// Block status.

/// A sparse 8 MiB device (holes at 4 KiB units) with data at 0..64 KiB,
/// 1 MiB..1 MiB+4 KiB and 5 MiB+8 KiB..6 MiB.
fn sparse_fixture() -> (Fixture, Vec<(u64, u32)>) {
    let size = 8 * MIB;
    let dev = Arc::new(SparseDevice {
        inner: MemDevice::new(size),
        unit: 4 * KIB,
    });
    let data = [
        (0, 64 * KIB),
        (MIB, 4 * KIB),
        (5 * MIB + 8 * KIB, MIB - 8 * KIB),
    ];
    for (i, &(at, n)) in data.iter().enumerate() {
        dev.write_at(&Pattern::XorShift.bytes(i as u64 + 1, n), at)
            .unwrap();
    }
    let expected = vec![
        (64 * KIB, 0),
        (MIB - 64 * KIB, HOLE),
        (4 * KIB, 0),
        (4 * MIB + 4 * KIB, HOLE),
        (MIB - 8 * KIB, 0),
        (2 * MIB, HOLE),
    ];
    (Fixture::new(dev), expected)
}

#[test]
fn allocation_of_a_sparse_device_extent_by_extent() {
    let (fx, expected) = sparse_fixture();
    let size = 8 * MIB;
    let mut c = fx.open(DISK, &[ALLOC]);
    assert_eq!(c.contexts().len(), 1);
    assert_eq!(c.block_status(ALLOC, 0, size).unwrap(), expected);
    // A range starting and ending inside extents: clipped at both ends.
    assert_eq!(
        c.block_status(ALLOC, 32 * KIB, MIB + 2 * KIB - 32 * KIB + 100)
            .unwrap(),
        vec![(32 * KIB, 0), (MIB - 64 * KIB, HOLE), (2 * KIB + 100, 0)]
    );
    assert_eq!(c.block_status(ALLOC, size - 1, 1).unwrap(), vec![(1, HOLE)]);
    assert_eq!(c.block_status(ALLOC, 0, 0).unwrap(), vec![]);
    // The data reads as written, the holes as zeroes.
    assert_eq!(
        read(&mut c, MIB, 4 * KIB),
        Pattern::XorShift.bytes(2, 4 * KIB)
    );
    assert_eq!(read(&mut c, 2 * MIB, 4 * KIB), vec![0; 4096]);
    c.disconnect().unwrap();
}

#[test]
fn allocation_of_a_sparse_image_shows_copied_chunks_as_data() {
    let (fx, _) = sparse_fixture();
    let size = 8 * MIB;
    fx.take();
    let chunk = fx.engine.image(DISK).unwrap().chunk_size();
    assert!(
        chunk >= 4 * KIB && (3 * MIB) % chunk == 0,
        "chunk size {chunk}"
    );
    // Written through the device after the take, into holes: the chunks
    // are copied (as zeroes) to the storage, and so data in the image.
    let mut dev = fx.open(DISK, &[ALLOC]);
    dev.write_at(&[1; 100], 3 * MIB + 10).unwrap();
    dev.write_at(&[2; 100], size - 100).unwrap();
    assert_eq!(
        dev.block_status(ALLOC, 3 * MIB, 8 * KIB).unwrap(),
        vec![(4 * KIB, 0), (4 * KIB, HOLE)],
        "the device itself is data where written"
    );
    let mut image = fx.open(IMAGE, &[ALLOC]);
    assert_eq!(
        image.block_status(ALLOC, 0, size).unwrap(),
        vec![
            (64 * KIB, 0),
            (MIB - 64 * KIB, HOLE),
            (4 * KIB, 0),
            (2 * MIB - 4 * KIB, HOLE),
            (chunk, 0),
            (2 * MIB + 8 * KIB - chunk, HOLE),
            (MIB - 8 * KIB, 0),
            (2 * MIB - chunk, HOLE),
            (chunk, 0),
        ]
    );
    // The copied chunks read as at the take: zeroes.
    assert_eq!(read(&mut image, 3 * MIB, 200), vec![0; 200]);
    assert_eq!(read(&mut image, size - 200, 200), vec![0; 200]);
    image.disconnect().unwrap();
    dev.disconnect().unwrap();
}

#[test]
fn allocation_asks_again_where_the_server_stops_short() {
    // Alternating 512-byte data and holes over 8 MiB: 16384 extents, more
    // than the server's 8192 descriptors in one reply.
    let size = 8 * MIB;
    let dev = Arc::new(SparseDevice {
        inner: MemDevice::new(size),
        unit: 512,
    });
    let mut content = vec![0u8; size as usize];
    for (i, unit) in content.chunks_mut(512).enumerate() {
        if i % 2 == 0 {
            unit.fill(0x5a);
        }
    }
    dev.write_at(&content, 0).unwrap();
    let fx = Fixture::new(dev);
    let mut c = fx.open(DISK, &[ALLOC]);
    let extents = c.block_status(ALLOC, 0, size).unwrap();
    assert_eq!(extents.len(), (size / 512) as usize);
    for (i, &(l, flags)) in extents.iter().enumerate() {
        assert_eq!(
            (l, flags),
            (512, if i % 2 == 0 { 0 } else { HOLE }),
            "extent {i}"
        );
    }
    c.disconnect().unwrap();
}

/// Per tracking block, whether `extents` (of a dirty bitmap, from 0) mark it
/// dirty, checking they follow block boundaries.
fn dirty_blocks(extents: &[(u64, u32)], block: u64, size: u64) -> Vec<usize> {
    let mut dirty = Vec::new();
    let mut pos = 0;
    for &(l, flags) in extents {
        assert_eq!(pos % block, 0, "extent at {pos} not on a block boundary");
        assert!(flags == 0 || flags == STATE_DIRTY, "flags {flags}");
        if flags == STATE_DIRTY {
            dirty.extend((pos / block) as usize..(pos + l).div_ceil(block) as usize);
        }
        pos += l;
    }
    assert_eq!(pos, size);
    dirty
}

#[test]
fn dirty_bitmap_since_1_after_two_takes_shows_the_blocks_written_between() {
    let size = 8 * MIB;
    let (fx, _disk) = Fixture::with_content(size, &[]);
    let block = u64::from(fx.engine.cbt_info(DISK).unwrap().block_size);
    let blocks = (size / block) as usize;
    let mut dev = fx.open(DISK, &[]);
    dev.write_at(&[1; 10], 100).unwrap(); // block 0, before the first take
    fx.take();
    for (at, n) in [
        (3 * block, block),
        (10 * block + 100, 1),
        (11 * block + block - 4 * KIB, 8 * KIB), // blocks 11 and 12
        (size - 512, 512),
    ] {
        dev.write_at(&Pattern::XorShift.bytes(at, n), at).unwrap();
    }
    fx.destroy_snapshot();
    fx.take();
    dev.write_at(&[3; 4096], 20 * block).unwrap(); // after the second take

    let since1 = "qemu:dirty-bitmap:since-1";
    let since0 = "qemu:dirty-bitmap:since-0";
    let mut image = fx.open(IMAGE, &[since1, ALLOC, since0]);
    let ids: Vec<&str> = image.contexts().iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(ids, [since1, ALLOC, since0]);
    let expected1 = vec![3, 10, 11, 12, blocks - 1];
    let status1 = image.block_status(since1, 0, size).unwrap();
    assert_eq!(dirty_blocks(&status1, block, size), expected1);
    let mut expected0 = vec![0];
    expected0.extend(&expected1);
    let status0 = image.block_status(since0, 0, size).unwrap();
    assert_eq!(dirty_blocks(&status0, block, size), expected0);
    // Extent by extent, and an unaligned range.
    assert_eq!(
        status1,
        vec![
            (3 * block, 0),
            (block, STATE_DIRTY),
            (6 * block, 0),
            (3 * block, STATE_DIRTY),
            (size - 14 * block, 0),
            (block, STATE_DIRTY),
        ]
    );
    assert_eq!(
        image
            .block_status(since1, 10 * block + 100, 3 * block)
            .unwrap(),
        vec![(3 * block - 100, STATE_DIRTY), (100, 0)]
    );
    // The allocation of the same connection: all data (a memory device).
    assert_eq!(image.block_status(ALLOC, 0, size).unwrap(), vec![(size, 0)]);
    // Not selected here, and not offered at all.
    let e = image
        .block_status("qemu:dirty-bitmap:since-3", 0, size)
        .unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
    let e = NbdClient::connect(&fx.unix(IMAGE), &["qemu:dirty-bitmap:since-2"]).unwrap_err();
    assert!(e.to_string().contains("qemu:dirty-bitmap:since-2"), "{e}");
    image.disconnect().unwrap();
    dev.disconnect().unwrap();
}

// ---------------------------------------------------------------------------
// Errors.

#[test]
fn errors_of_the_server_and_of_the_caller() {
    let size = 4 * MIB;
    let (fx, _disk) = Fixture::with_content(size, &Pattern::Ramp.bytes(0, 4096));

    // Unknown export, with and without contexts, over Unix and TCP.
    for contexts in [&[][..], &[ALLOC][..]] {
        for address in [fx.unix("nope/nothing"), fx.tcp("nope/nothing")] {
            let e = NbdClient::connect(&address, contexts).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
            assert!(e.to_string().contains("nope/nothing"), "{e}");
        }
    }
    // A context the server lacks (devices have no dirty bitmaps).
    let e = NbdClient::connect(&fx.unix(DISK), &[ALLOC, "qemu:dirty-bitmap:since-0"]).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::Unsupported, "{e}");
    assert!(e.to_string().contains("qemu:dirty-bitmap:since-0"), "{e}");
    // No image before a take.
    let e = NbdClient::connect(&fx.unix(IMAGE), &[]).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
    // Nothing listening.
    let gone = NbdAddress::Unix {
        socket: fx.dir.path().join("nobody.sock"),
        export: DISK.into(),
    };
    let e = NbdClient::connect(&gone, &[]).unwrap_err();
    assert!(e.to_string().contains("nobody.sock"), "{e}");

    let mut c = fx.open(DISK, &[ALLOC]);
    // Reads past the end: EINVAL from the server, with its message.
    let mut buf = vec![0u8; 4096];
    let e = c.read_at(&mut buf, size - 100).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(EINVAL as i32), "{e}");
    assert!(
        c.last_error_message().unwrap().contains("beyond"),
        "{:?}",
        c.last_error_message()
    );
    let e = c.read_at(&mut buf, u64::MAX - 10).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
    // Writes past the end: ENOSPC.
    let e = c.write_at(&buf, size - 1).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(ENOSPC as i32), "{e}");
    // Block status past the end: EINVAL.
    let e = c.block_status(ALLOC, size, 512).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(EINVAL as i32), "{e}");
    let e = c.block_status("nope:nothing", 0, 512).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
    // None of that broke the connection.
    assert_eq!(read(&mut c, 0, 4096), Pattern::Ramp.bytes(0, 4096));
    assert_eq!(c.block_status(ALLOC, 0, size).unwrap(), vec![(size, 0)]);
    c.disconnect().unwrap();

    // An image destroyed under its connection: EIO, the connection lives.
    fx.take();
    let mut image = fx.open(IMAGE, &[ALLOC]);
    assert_eq!(read(&mut image, 0, 4096), Pattern::Ramp.bytes(0, 4096));
    fx.destroy_snapshot();
    let e = image.read_at(&mut buf, 0).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(EIO as i32), "{e}");
    assert!(!image.last_error_message().unwrap().is_empty());
    let e = image.block_status(ALLOC, 0, 4096).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(EIO as i32), "{e}");
    image.disconnect().unwrap();
    fx.wait_connections(0);
}

#[test]
fn dropping_a_client_disconnects_it() {
    let (fx, _disk) = Fixture::with_content(MIB, &[]);
    let c = fx.open(DISK, &[]);
    fx.wait_connections(1);
    drop(c);
    fx.wait_connections(0);
}

// ---------------------------------------------------------------------------
// URIs.

#[test]
fn uris_parse() {
    let unix = |s: &str, e: &str| NbdAddress::Unix {
        socket: s.into(),
        export: e.into(),
    };
    let tcp = |h: &str, p: u16, e: &str| NbdAddress::Tcp {
        host: h.into(),
        port: p,
        export: e.into(),
    };
    let good = [
        (
            "nbd+unix:///disk0?socket=/run/blksnap/nbd.sock",
            unix("/run/blksnap/nbd.sock", "disk0"),
        ),
        (
            "nbd+unix:///snapshot/disk0?socket=/run/nbd.sock",
            unix("/run/nbd.sock", "snapshot/disk0"),
        ),
        (
            "nbd+unix:///snapshot%2Fdisk0?socket=/tmp/a%20b.sock",
            unix("/tmp/a b.sock", "snapshot/disk0"),
        ),
        ("NBD+UNIX://?socket=rel.sock", unix("rel.sock", "")),
        (
            "nbd+unix:///my%20disk%23%3F?other=1&socket=/s",
            unix("/s", "my disk#?"),
        ),
        ("nbd+unix:///%C3%A9t%C3%A9?socket=/s", unix("/s", "été")),
        ("nbd://localhost/disk", tcp("localhost", 10809, "disk")),
        (
            "nbd://127.0.0.1:10810/snapshot/disk",
            tcp("127.0.0.1", 10810, "snapshot/disk"),
        ),
        (
            "nbd://[::1]:12345/snapshot%2Fdisk",
            tcp("::1", 12345, "snapshot/disk"),
        ),
        ("nbd://[::1]/x", tcp("::1", 10809, "x")),
        ("nbd://host", tcp("host", 10809, "")),
        ("nbd://host:99/", tcp("host", 99, "")),
        ("nbd://host//lead", tcp("host", 10809, "/lead")),
    ];
    for (uri, want) in good {
        let got = NbdAddress::parse(uri).unwrap_or_else(|e| panic!("{uri}: {e}"));
        assert_eq!(got, want, "{uri}");
        assert_eq!(got.export(), want.export());
        // Display gives a URI that parses back to the same address.
        let again = NbdAddress::parse(&got.to_string()).unwrap();
        assert_eq!(again, got, "{uri} -> {got}");
    }
    // What the server hands out.
    let socket = Path::new("/run/blksnap/nbd.sock");
    assert_eq!(
        NbdAddress::parse(&unix_uri(socket, "snapshot/disk0")).unwrap(),
        unix("/run/blksnap/nbd.sock", "snapshot/disk0")
    );

    let bad = [
        ("", "expected"),
        ("disk0", "expected"),
        ("nbd:/disk", "expected"),
        ("http://host/disk", "scheme"),
        ("nbds://host/disk", "TLS"),
        ("nbds+unix:///disk?socket=/s", "TLS"),
        ("nbd+vsock://1:2/disk", "vsock"),
        ("nbd+unix:///disk", "socket"),
        ("nbd+unix:///disk?socket=", "socket"),
        ("nbd+unix:///disk?socket=/a&socket=/b", "twice"),
        ("nbd+unix://host/disk?socket=/s", "no host"),
        ("nbd:///disk", "host"),
        ("nbd://:10809/disk", "host"),
        ("nbd://host:0/disk", "port"),
        ("nbd://host:65536/disk", "port"),
        ("nbd://host:+1/disk", "port"),
        ("nbd://host:/disk", "port"),
        ("nbd://host:x/disk", "port"),
        ("nbd://::1/disk", "brackets"),
        ("nbd://[::1/disk", "'['"),
        ("nbd://[::1]x/disk", "']'"),
        ("nbd://user@host/disk", "@"),
        ("nbd://host/disk?socket=/s", "nbd+unix"),
        ("nbd://host/a%zz", "percent"),
        ("nbd://host/a%4", "percent"),
        ("nbd://host/%C3%28", "UTF-8"),
        ("nbd://host/a%00b", "NUL"),
        ("nbd://host/disk#frag", "fragment"),
    ];
    for (uri, why) in bad {
        let e = NbdAddress::parse(uri).expect_err(uri);
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{uri}: {e}");
        assert!(e.to_string().contains(why), "{uri}: {e} (expected {why:?})");
        assert!(e.to_string().contains(&format!("{uri:?}")), "{uri}: {e}");
    }
    let long = format!("nbd://host/{}", "x".repeat(4097));
    assert!(NbdAddress::parse(&long).is_err());
}

// ---------------------------------------------------------------------------
// A scripted server that breaks the protocol.

struct Script {
    size: u64,
    block_size: (u32, u32, u32),
    /// Grant this context too, unasked.
    extra_context: Option<&'static str>,
}

const SCRIPT: Script = Script {
    size: MIB,
    block_size: (1, 4096, 32 << 20),
    extra_context: None,
};

type Respond = Box<dyn FnMut(&Request, &mut UnixStream) -> io::Result<()> + Send>;

/// Serves one connection on a new socket: a correct handshake (structured
/// replies; the contexts asked for granted with ids 1, 2, …), then
/// `respond` for every request. Returns the requests it got.
fn scripted(
    script: Script,
    mut respond: Respond,
) -> (tempfile::TempDir, NbdAddress, JoinHandle<Vec<Request>>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fake.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let handle = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut requests = Vec::new();
        if fake_handshake(&mut s, &script).is_err() {
            return requests;
        }
        loop {
            let mut h = [0u8; REQUEST_LEN];
            if s.read_exact(&mut h).is_err() {
                return requests;
            }
            let r = Request::parse(&h).expect("request magic");
            if r.command == CMD_DISC {
                return requests;
            }
            if r.command == CMD_WRITE {
                let mut payload = vec![0u8; r.length as usize];
                s.read_exact(&mut payload).unwrap();
            }
            requests.push(r);
            if respond(&r, &mut s).is_err() {
                return requests;
            }
        }
    });
    let address = NbdAddress::Unix {
        socket: path,
        export: "fake".into(),
    };
    (dir, address, handle)
}

fn fake_handshake(s: &mut UnixStream, script: &Script) -> io::Result<()> {
    let mut hello = NBDMAGIC.to_be_bytes().to_vec();
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello)?;
    let mut flags = [0u8; 4];
    s.read_exact(&mut flags)?;
    loop {
        let mut h = [0u8; 16];
        s.read_exact(&mut h)?;
        let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let mut data = vec![0u8; u32::from_be_bytes(h[12..16].try_into().unwrap()) as usize];
        s.read_exact(&mut data)?;
        match option {
            OPT_STRUCTURED_REPLY => s.write_all(&option_reply(option, REP_ACK, &[]))?,
            OPT_SET_META_CONTEXT => {
                let name_len = u32::from_be_bytes(data[0..4].try_into().unwrap()) as usize;
                let mut at = 4 + name_len;
                let count = u32::from_be_bytes(data[at..at + 4].try_into().unwrap());
                at += 4;
                let mut names = Vec::new();
                for _ in 0..count {
                    let l = u32::from_be_bytes(data[at..at + 4].try_into().unwrap()) as usize;
                    names.push(data[at + 4..at + 4 + l].to_vec());
                    at += 4 + l;
                }
                names.extend(script.extra_context.map(|c| c.as_bytes().to_vec()));
                for (i, name) in names.iter().enumerate() {
                    let mut p = (i as u32 + 1).to_be_bytes().to_vec();
                    p.extend_from_slice(name);
                    s.write_all(&option_reply(option, REP_META_CONTEXT, &p))?;
                }
                s.write_all(&option_reply(option, REP_ACK, &[]))?;
            }
            OPT_GO => {
                let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                info.extend_from_slice(&script.size.to_be_bytes());
                info.extend_from_slice(&(TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH).to_be_bytes());
                s.write_all(&option_reply(option, REP_INFO, &info))?;
                let (min, pref, max) = script.block_size;
                let mut info = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                for v in [min, pref, max] {
                    info.extend_from_slice(&v.to_be_bytes());
                }
                s.write_all(&option_reply(option, REP_INFO, &info))?;
                s.write_all(&option_reply(option, REP_ACK, &[]))?;
                return Ok(());
            }
            _ => s.write_all(&option_reply(option, REP_ERR_UNSUP, &[]))?,
        }
    }
}

fn data_chunk(flags: u16, cookie: u64, offset: u64, data: &[u8]) -> Vec<u8> {
    let mut b = chunk_header(flags, REPLY_TYPE_OFFSET_DATA, cookie, 8 + data.len() as u32).to_vec();
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(data);
    b
}

fn hole_chunk(flags: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut b = chunk_header(flags, REPLY_TYPE_OFFSET_HOLE, cookie, 12).to_vec();
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b
}

fn error_chunk(cookie: u64, errno: u32, message: &str) -> Vec<u8> {
    let mut b = chunk_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        6 + message.len() as u32,
    )
    .to_vec();
    b.extend_from_slice(&errno.to_be_bytes());
    b.extend_from_slice(&(message.len() as u16).to_be_bytes());
    b.extend_from_slice(message.as_bytes());
    b
}

/// A compact block status chunk; the lengths (a request's, say) must fit
/// its 32 bits.
fn status_chunk(flags: u16, cookie: u64, id: u32, descriptors: &[(u64, u32)]) -> Vec<u8> {
    let mut b = chunk_header(
        flags,
        REPLY_TYPE_BLOCK_STATUS,
        cookie,
        4 + 8 * descriptors.len() as u32,
    )
    .to_vec();
    b.extend_from_slice(&id.to_be_bytes());
    for &(l, f) in descriptors {
        b.extend_from_slice(&u32::try_from(l).unwrap().to_be_bytes());
        b.extend_from_slice(&f.to_be_bytes());
    }
    b
}

/// The content of the scripted export: byte i is `i % 251`.
fn fake_bytes(offset: u64, len: u64) -> Vec<u8> {
    (offset..offset + len).map(|i| (i % 251) as u8).collect()
}

/// A correct structured read reply: data, with the middle third a hole.
fn good_read(r: &Request) -> Vec<u8> {
    let len = r.length;
    let third = len / 3;
    let mut b = data_chunk(0, r.cookie, r.offset, &fake_bytes(r.offset, third));
    if third > 0 {
        b.extend(hole_chunk(0, r.cookie, r.offset + third, third as u32));
    }
    let rest = len - 2 * third;
    b.extend(data_chunk(
        REPLY_FLAG_DONE,
        r.cookie,
        r.offset + 2 * third,
        &fake_bytes(r.offset + 2 * third, rest),
    ));
    b
}

/// The expected read of [offset, offset+len) from `good_read` replies of
/// requests of at most `max` bytes.
fn good_content(offset: u64, len: u64, max: u64) -> Vec<u8> {
    let mut out = Vec::new();
    let mut pos = offset;
    while pos < offset + len {
        let n = (offset + len - pos).min(max);
        let third = n / 3;
        out.extend(fake_bytes(pos, third));
        out.extend(vec![0; third as usize]);
        out.extend(fake_bytes(pos + 2 * third, n - 2 * third));
        pos += n;
    }
    out
}

/// A reply made from its request.
type ReplyFn = fn(&Request) -> Vec<u8>;

/// A read (of 4 KiB at 512) the script answers with `reply` made from the
/// request: the error it gives, and the calls after it fail as unusable.
fn broken_read(reply: ReplyFn) -> io::Error {
    let (_dir, address, server) = scripted(
        SCRIPT,
        // Then hangs up, so a client waiting for more sees the end.
        Box::new(move |r, s| {
            s.write_all(&reply(r))?;
            Err(io::Error::other("hang up"))
        }),
    );
    let mut c = NbdClient::connect_timeout(&address, &[], Some(TIMEOUT)).unwrap();
    let mut buf = vec![0u8; 4096];
    let e = c.read_at(&mut buf, 512).unwrap_err();
    let again = c.read_at(&mut buf, 0).unwrap_err();
    assert_eq!(again.kind(), io::ErrorKind::NotConnected, "{again}");
    drop(c);
    let requests = server.join().unwrap();
    assert_eq!(requests.len(), 1, "nothing sent after the violation");
    e
}

#[test]
fn protocol_violations_in_read_replies_are_invalid_data() {
    let cases: [(&str, ReplyFn); 12] = [
        ("cookie", |r| {
            good_read(&Request {
                cookie: r.cookie + 1,
                ..*r
            })
        }),
        ("magic", |r| {
            let mut b = good_read(r);
            b[0] ^= 0xff;
            b
        }),
        ("simple reply", |r| simple_reply(0, r.cookie).to_vec()),
        ("outside", |r| {
            data_chunk(REPLY_FLAG_DONE, r.cookie, r.offset + 1, &[0; 4096])
        }),
        ("outside", |r| {
            hole_chunk(REPLY_FLAG_DONE, r.cookie, r.offset - 512, 600)
        }),
        ("overlap", |r| {
            let mut b = data_chunk(0, r.cookie, r.offset, &[1; 2048]);
            b.extend(hole_chunk(REPLY_FLAG_DONE, r.cookie, r.offset + 2047, 2049));
            b
        }),
        ("covering 2048 of 4096", |r| {
            data_chunk(REPLY_FLAG_DONE, r.cookie, r.offset, &[1; 2048])
        }),
        // A length no read of 4 KiB can have: refused before any payload.
        ("OFFSET_DATA chunk of 4294967280", |r| {
            chunk_header(
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                r.cookie,
                0xffff_fff0,
            )
            .to_vec()
        }),
        ("empty OFFSET_HOLE", |r| {
            hole_chunk(REPLY_FLAG_DONE, r.cookie, r.offset, 0)
        }),
        ("type 7", |r| {
            chunk_header(REPLY_FLAG_DONE, 7, r.cookie, 0).to_vec()
        }),
        ("NONE chunk without the DONE", |r| {
            chunk_header(0, REPLY_TYPE_NONE, r.cookie, 0).to_vec()
        }),
        ("error 0", |r| error_chunk(r.cookie, 0, "no error")),
    ];
    for (what, reply) in cases {
        let e = broken_read(reply);
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{what}: {e}");
        assert!(e.to_string().contains(what), "expected {what:?} in: {e}");
    }
    // The server hanging up in the middle of a reply.
    let e = broken_read(|r| {
        data_chunk(REPLY_FLAG_DONE, r.cookie, r.offset, &[1; 4096])[..100].to_vec()
    });
    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
}

#[test]
fn scripted_reads_split_at_max_payload_and_errors_keep_the_connection() {
    let script = Script {
        block_size: (512, 4096, 8192),
        ..SCRIPT
    };
    let fail_next = Arc::new(Mutex::new(false));
    let (_dir, address, server) = scripted(script, {
        let fail_next = fail_next.clone();
        Box::new(move |r, s| {
            if std::mem::take(&mut *fail_next.lock().unwrap()) {
                // Data first, then the error: the read fails as a whole.
                s.write_all(&data_chunk(0, r.cookie, r.offset, &[9; 100]))?;
                return s.write_all(&error_chunk(r.cookie, EIO, "the disk is on fire"));
            }
            match r.command {
                CMD_READ => s.write_all(&good_read(r)),
                _ => s.write_all(&simple_reply(0, r.cookie)),
            }
        })
    });
    let mut c = NbdClient::connect_timeout(&address, &[], Some(TIMEOUT)).unwrap();
    assert_eq!(c.max_payload(), 8192);
    assert_eq!(c.block_size(), Some((512, 4096, 8192)));
    assert_eq!(
        read(&mut c, 1024, 20 * KIB + 512),
        good_content(1024, 20 * KIB + 512, 8192)
    );
    *fail_next.lock().unwrap() = true;
    let e = c.read_at(&mut [0u8; 1024], 0).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(EIO as i32), "{e}");
    assert_eq!(c.last_error_message(), Some("the disk is on fire"));
    assert_eq!(read(&mut c, 0, 3000), good_content(0, 3000, 8192));
    c.write_at(&[1; 10000], 0).unwrap();
    c.flush().unwrap();
    c.disconnect().unwrap();
    let requests = server.join().unwrap();
    let shape: Vec<(u16, u64, u64)> = requests
        .iter()
        .map(|r| (r.command, r.offset, r.length))
        .collect();
    assert_eq!(
        shape,
        [
            (CMD_READ, 1024, 8192),
            (CMD_READ, 1024 + 8192, 8192),
            (CMD_READ, 1024 + 16384, 4608),
            (CMD_READ, 0, 1024),
            (CMD_READ, 0, 3000),
            (CMD_WRITE, 0, 8192),
            (CMD_WRITE, 8192, 1808),
            (CMD_FLUSH, 0, 0),
        ]
    );
    // Cookies are distinct.
    let mut cookies: Vec<u64> = requests.iter().map(|r| r.cookie).collect();
    cookies.dedup();
    assert_eq!(cookies.len(), requests.len());
}

#[test]
fn scripted_block_status_is_clipped_and_asked_again() {
    // Two contexts; the one asked for comes second, the reply stops short
    // the first time and runs past the end the second time.
    let (_dir, address, server) = scripted(
        SCRIPT,
        Box::new(|r, s| {
            let half = r.length / 2;
            let other = status_chunk(0, r.cookie, 1, &[(r.length, 0)]);
            let mine = if r.offset == 1000 {
                status_chunk(REPLY_FLAG_DONE, r.cookie, 2, &[(100, 1), (half - 100, 0)])
            } else {
                status_chunk(
                    REPLY_FLAG_DONE,
                    r.cookie,
                    2,
                    &[(10, 0), (r.length + 4096, 1)],
                )
            };
            s.write_all(&other)?;
            s.write_all(&mine)
        }),
    );
    let mut c = NbdClient::connect_timeout(&address, &["a:one", "b:two"], Some(TIMEOUT)).unwrap();
    assert_eq!(
        c.contexts(),
        [("a:one".to_string(), 1), ("b:two".to_string(), 2)]
    );
    let extents = c.block_status("b:two", 1000, 10000).unwrap();
    assert_eq!(
        extents,
        vec![(100, 1), (4900, 0), (10, 0), (4990, 1)]
            .into_iter()
            .fold(Vec::<(u64, u32)>::new(), |mut v, (l, f)| {
                match v.last_mut() {
                    Some(last) if last.1 == f => last.0 += l,
                    _ => v.push((l, f)),
                }
                v
            })
    );
    assert_eq!(extents.iter().map(|e| e.0).sum::<u64>(), 10000);
    c.disconnect().unwrap();
    let shape: Vec<(u64, u64)> = server
        .join()
        .unwrap()
        .iter()
        .map(|r| (r.offset, r.length))
        .collect();
    assert_eq!(shape, [(1000, 10000), (6000, 5000)]);
}

#[test]
fn protocol_violations_in_block_status_and_handshake() {
    let cases: [(&str, ReplyFn); 5] = [
        ("length 0", |r| {
            status_chunk(REPLY_FLAG_DONE, r.cookie, 1, &[(0, 0)])
        }),
        ("context id 9", |r| {
            status_chunk(REPLY_FLAG_DONE, r.cookie, 9, &[(r.length, 0)])
        }),
        ("two BLOCK_STATUS chunks", |r| {
            let mut b = status_chunk(0, r.cookie, 1, &[(r.length, 0)]);
            b.extend(status_chunk(REPLY_FLAG_DONE, r.cookie, 1, &[(r.length, 0)]));
            b
        }),
        ("past the end", |r| {
            status_chunk(REPLY_FLAG_DONE, r.cookie, 1, &[(r.length, 0), (1, 0)])
        }),
        ("no block status", |r| {
            chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, r.cookie, 0).to_vec()
        }),
    ];
    for (what, reply) in cases {
        let (_dir, address, server) =
            scripted(SCRIPT, Box::new(move |r, s| s.write_all(&reply(r))));
        let mut c = NbdClient::connect_timeout(&address, &["a:one"], Some(TIMEOUT)).unwrap();
        let e = c.block_status("a:one", 0, 4096).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{what}: {e}");
        assert!(e.to_string().contains(what), "expected {what:?} in: {e}");
        drop(c);
        server.join().unwrap();
    }

    // Handshake: an unasked context, bad block sizes.
    let script = Script {
        extra_context: Some("x:extra"),
        ..SCRIPT
    };
    let (_dir, address, server) = scripted(script, Box::new(|_, _| Ok(())));
    let e = NbdClient::connect_timeout(&address, &["a:one"], Some(TIMEOUT)).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    assert!(e.to_string().contains("x:extra"), "{e}");
    server.join().unwrap();
    for block_size in [
        (3, 4096, 8192),
        (512, 4096, 1000),
        (1 << 17, 1 << 17, 1 << 20),
        (1, 3000, 8192),
    ] {
        let script = Script {
            block_size,
            ..SCRIPT
        };
        let (_dir, address, server) = scripted(script, Box::new(|_, _| Ok(())));
        let e = NbdClient::connect_timeout(&address, &[], Some(TIMEOUT)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{block_size:?}: {e}");
        assert!(e.to_string().contains("block sizes"), "{e}");
        server.join().unwrap();
    }
}

// ---------------------------------------------------------------------------
// Interoperability: nbdkit.

/// Whether nbdkit runs here; without it the test is skipped loudly, except
/// in CI (CI=true), where it fails.
fn have_nbdkit() -> bool {
    let ok = Command::new("nbdkit")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "nbdkit is not installed, and CI=true requires the interoperability test"
        );
        eprintln!("SKIPPED: nbdkit is not installed; the nbdkit interoperability test did not run");
    }
    ok
}

/// An nbdkit process we started, killed when dropped.
struct Nbdkit(Child);

impl Drop for Nbdkit {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn nbdkit(socket: &Path, args: &[&str]) -> Nbdkit {
    let child = Command::new("nbdkit")
        .arg("--unix")
        .arg(socket)
        .arg("--foreground")
        .args(args)
        .stdin(Stdio::null())
        .spawn()
        .expect("start nbdkit");
    let kit = Nbdkit(child);
    let start = Instant::now();
    while UnixStream::connect(socket).is_err() {
        assert!(
            start.elapsed() < TIMEOUT,
            "nbdkit did not listen on {}",
            socket.display()
        );
        thread::sleep(Duration::from_millis(20));
    }
    kit
}

#[test]
fn nbdkit_file_reads_match_the_file() {
    if !have_nbdkit() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = 5 * MIB + 1000;
    let path = blksnap_test_support::sparse_file(dir.path(), "disk.img", size);
    let mut content = vec![0u8; size as usize];
    {
        let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        use std::io::Seek;
        for (i, (at, n)) in [(0, MIB), (3 * MIB + 5, 100 * KIB), (size - 1000, 1000)]
            .into_iter()
            .enumerate()
        {
            let data = Pattern::RandomFill.bytes(i as u64 + 7, n);
            f.seek(io::SeekFrom::Start(at)).unwrap();
            f.write_all(&data).unwrap();
            content[at as usize..(at + n) as usize].copy_from_slice(&data);
        }
    }
    let file = path.to_str().unwrap();

    let socket = dir.path().join("nbdkit.sock");
    let _kit = nbdkit(&socket, &["file", file]);
    let address =
        NbdAddress::parse(&format!("nbd+unix:///?socket={}", socket.to_str().unwrap())).unwrap();
    let mut c = NbdClient::connect_timeout(&address, &[ALLOC], Some(TIMEOUT)).unwrap();
    assert_eq!(c.size(), size);
    assert!(c.structured_replies());
    assert!(c.max_payload() >= 64 << 10 && c.max_payload() <= MAX_PAYLOAD);
    assert_same(&read(&mut c, 0, size), &content, "nbdkit file, whole");
    assert_same(
        &read(&mut c, 3 * MIB, 200 * KIB),
        &content[3 << 20..(3 << 20) + (200 << 10)],
        "nbdkit file, part",
    );
    // Allocation covers the file exactly, and the data written is data.
    let extents = c.block_status(ALLOC, 0, size).unwrap();
    assert_eq!(extents.iter().map(|e| e.0).sum::<u64>(), size);
    let mut pos = 0;
    for &(l, flags) in &extents {
        if flags & STATE_ZERO != 0 {
            assert!(
                content[pos as usize..(pos + l) as usize]
                    .iter()
                    .all(|&b| b == 0),
                "zero extent at {pos} holds data"
            );
        }
        pos += l;
    }
    // A write lands in the file.
    c.write_at(b"written by the client", 2 * MIB).unwrap();
    c.flush().unwrap();
    c.disconnect().unwrap();
    let on_disk = std::fs::read(&path).unwrap();
    assert_eq!(
        &on_disk[(2 * MIB) as usize..(2 * MIB) as usize + 21],
        b"written by the client"
    );
    content[(2 * MIB) as usize..(2 * MIB) as usize + 21].copy_from_slice(b"written by the client");

    // Without structured replies (--no-sr): simple replies; no contexts.
    drop(_kit);
    let socket = dir.path().join("nbdkit-no-sr.sock");
    let address = NbdAddress::Unix {
        socket: socket.clone(),
        export: String::new(),
    };
    let _kit = nbdkit(&socket, &["--no-sr", "file", file]);
    let mut c = NbdClient::connect_timeout(&address, &[], Some(TIMEOUT)).unwrap();
    assert!(!c.structured_replies());
    assert_same(
        &read(&mut c, 0, size),
        &content,
        "nbdkit --no-sr file, whole",
    );
    let e = c.read_at(&mut [0u8; 10], size - 5).unwrap_err();
    assert!(e.raw_os_error().is_some(), "{e}");
    assert_same(&read(&mut c, 5, 10), &content[5..15], "after an error");
    c.disconnect().unwrap();
    let e = NbdClient::connect_timeout(&address, &[ALLOC], Some(TIMEOUT)).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::Unsupported, "{e}");
}
