//! What the handshake fuzz targets share: the engine they serve (a 1 MiB
//! memory device `disk` whose snapshot is taken, so the image
//! `snapshot/disk` and its dirty-bitmap contexts exist) and the recipe that
//! turns fuzz input into a well-framed client stream.

use std::sync::Arc;

use blksnap_engine::{Config, Engine, MemDevice, SnapshotOptions, StorageSpec};
use blksnap_nbd::protocol::{
    CLIENT_FIXED_NEWSTYLE, CLIENT_NO_ZEROES, EXTENDED_REQUEST_LEN, EXTENDED_REQUEST_MAGIC,
    IHAVEOPT, REQUEST_LEN, REQUEST_MAGIC,
};

/// An engine tracking `disk`, with a snapshot of it taken.
pub fn engine() -> Arc<Engine> {
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
    engine
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
pub fn recipe(mut it: &[u8]) -> Vec<u8> {
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
