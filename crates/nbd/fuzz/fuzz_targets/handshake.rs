//! Fuzzes the option haggling (and whatever transmission follows it)
//! through the public API only: one in-process server on a Unix socket,
//! tracking a 1 MiB memory device `disk` whose snapshot is taken (so the
//! image `snapshot/disk` and its dirty-bitmap contexts exist). Each input is
//! everything a client says after the server's greeting; the client then
//! closes its side and the server must end the connection within seconds,
//! without a panic in any of its threads (libfuzzer-sys aborts on any
//! panic), whatever it answered.
//!
//! An input whose first byte is even is sent as it is; otherwise the rest is
//! a recipe for a well-framed stream (see [`recipe`]) that gets past the
//! magic numbers, so the fuzzer reaches the option payload parsers, the
//! metadata contexts and the transmission phase.

#![no_main]

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use blksnap_engine::{Config, Engine, MemDevice, SnapshotOptions, StorageSpec};
use blksnap_nbd::protocol::{
    CLIENT_FIXED_NEWSTYLE, CLIENT_NO_ZEROES, EXTENDED_REQUEST_LEN, EXTENDED_REQUEST_MAGIC,
    IHAVEOPT, NBDMAGIC, REQUEST_LEN, REQUEST_MAGIC,
};
use blksnap_nbd::NbdServer;
use libfuzzer_sys::fuzz_target;

struct Served {
    socket: PathBuf,
    _server: Arc<NbdServer>,
}

fn served() -> &'static Served {
    static SERVED: OnceLock<Served> = OnceLock::new();
    SERVED.get_or_init(|| {
        let engine = Arc::new(Engine::new(Config::default()).unwrap());
        engine
            .attach("disk", Arc::new(MemDevice::new(1 << 20)))
            .unwrap();
        let storage = StorageSpec::Device(Arc::new(MemDevice::new(8 << 20)));
        let id = engine
            .snapshot_create(storage, SnapshotOptions::default())
            .unwrap();
        engine.snapshot_add(&id, "disk").unwrap();
        engine.snapshot_take(&id).unwrap();
        let server = NbdServer::new(engine);
        let socket =
            std::env::temp_dir().join(format!("blksnap-nbd-fuzz-{}.sock", std::process::id()));
        server.listen_unix(&socket).unwrap();
        Served {
            socket,
            _server: server,
        }
    })
}

const NAMES: [&str; 4] = ["disk", "snapshot/disk", "", "nope"];
const QUERIES: [&str; 6] = [
    "base:allocation",
    "qemu:dirty-bitmap:since-0",
    "qemu:dirty-bitmap:",
    "qemu:",
    "base:",
    "",
];

/// Takes `n` bytes (fewer at the end of the input).
fn take<'a>(it: &mut &'a [u8], n: usize) -> &'a [u8] {
    let (head, tail) = it.split_at(n.min(it.len()));
    *it = tail;
    head
}

fn byte(it: &mut &[u8]) -> u8 {
    take(it, 1).first().copied().unwrap_or(0)
}

fn string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

/// A client stream from a recipe: valid client flags, then per step an
/// opcode byte whose low nibble is the option (0-15: every known option and
/// some unknown ones) and whose high nibble the form of the step: a raw
/// payload (0-6), a length field that lies (7), an INFO/GO payload (8-10),
/// a META_CONTEXT payload (11-13), or a transmission request with the right
/// magic: compact (14) or extended (15, for after EXTENDED_HEADERS).
fn recipe(mut it: &[u8]) -> Vec<u8> {
    let mut out = (CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    while !it.is_empty() {
        let op = byte(&mut it);
        let option = (op & 0x0f) as u32;
        let mut payload = Vec::new();
        let mut len = None;
        match op >> 4 {
            0..=6 => {
                let n = byte(&mut it) as usize;
                payload.extend_from_slice(take(&mut it, n));
            }
            7 => {
                let mut b = [0u8; 4];
                let field = take(&mut it, 4);
                b[..field.len()].copy_from_slice(field);
                len = Some(u32::from_be_bytes(b));
                let n = byte(&mut it) as usize;
                payload.extend_from_slice(take(&mut it, n));
            }
            8..=10 => {
                string(&mut payload, NAMES[byte(&mut it) as usize % NAMES.len()]);
                let count = byte(&mut it) % 5;
                payload.extend_from_slice(&(count as u16).to_be_bytes());
                for _ in 0..count {
                    payload.extend_from_slice(&(byte(&mut it) as u16 % 5).to_be_bytes());
                }
            }
            11..=13 => {
                string(&mut payload, NAMES[byte(&mut it) as usize % NAMES.len()]);
                let count = byte(&mut it) % 4;
                payload.extend_from_slice(&(count as u32).to_be_bytes());
                for _ in 0..count {
                    string(
                        &mut payload,
                        QUERIES[byte(&mut it) as usize % QUERIES.len()],
                    );
                }
            }
            14 => {
                out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
                out.extend_from_slice(take(&mut it, REQUEST_LEN - 4));
                continue;
            }
            _ => {
                out.extend_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
                out.extend_from_slice(take(&mut it, EXTENDED_REQUEST_LEN - 4));
                continue;
            }
        }
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&len.unwrap_or(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(&payload);
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let stream = if mode % 2 == 0 {
        rest.to_vec()
    } else {
        recipe(rest)
    };
    let served = served();
    let mut s = UnixStream::connect(&served.socket).expect("the server stopped accepting");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).expect("no greeting");
    assert_eq!(u64::from_be_bytes(hello[..8].try_into().unwrap()), NBDMAGIC);
    assert_eq!(
        u64::from_be_bytes(hello[8..16].try_into().unwrap()),
        IHAVEOPT
    );
    // The server may hang up before taking everything.
    let _ = s.write_all(&stream);
    let _ = s.shutdown(Shutdown::Write);
    let mut out = Vec::new();
    if let Err(e) = s.read_to_end(&mut out) {
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset,
            "the server did not end the connection: {e}"
        );
    }
});
