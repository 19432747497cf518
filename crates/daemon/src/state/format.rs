//! The on-disk forms of a device's tracking state: the saved state (`.cbt`)
//! and the write-ahead journal (`.journal`). Both are little-endian, begin
//! with a magic and a version, and are self-checking (a CRC-32 of every byte
//! before it: a file is used whole or not at all); `docs/blksnapd.md`
//! ("Persistence") describes them byte by byte.
//!
//! Invariants: a journal belongs to the saved state with the same `epoch`;
//! any other journal is older than the state and ignored. A journal's
//! records each carry their own checksum, so a record torn by a crash ends
//! the replay (it was never acknowledged) instead of corrupting it.
//!
//! Callers: [`super::StateDir`] (save and load) and [`super::Journal`]
//! (records).

use blksnap_engine::{CbtState, Change, GenerationReason};
use uuid::Uuid;

pub const STATE_MAGIC: &[u8; 8] = b"BLKSNAPS";
pub const JOURNAL_MAGIC: &[u8; 8] = b"BLKSNAPJ";
pub const VERSION: u32 = 1;
/// Bytes of the saved state's header.
const STATE_HEADER: usize = 8 + 4 + 4 + 8 + 16 + 1 + 1 + 6 + 8 + 8;
pub const JOURNAL_HEADER: usize = 8 + 4 + 4 + 8 + 4 + 4;
pub const RECORD: usize = 32;

/// A generation reason as one byte: its place in [`GenerationReason::ALL`].
fn reason_code(reason: GenerationReason) -> u8 {
    GenerationReason::ALL
        .iter()
        .position(|&r| r == reason)
        .expect("every reason is in ALL") as u8
}

fn reason_of(code: u8) -> Result<GenerationReason, String> {
    GenerationReason::ALL
        .get(usize::from(code))
        .copied()
        .ok_or_else(|| format!("unknown generation reason code {code}"))
}

fn crc(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// The saved state: header, live map, readable map, CRC-32 of all before.
pub fn encode_state(state: &CbtState, epoch: u64) -> Vec<u8> {
    let count = state.live.len();
    let mut b = Vec::with_capacity(STATE_HEADER + 2 * count + 4);
    b.extend_from_slice(STATE_MAGIC);
    b.extend_from_slice(&VERSION.to_le_bytes());
    b.extend_from_slice(&state.block_size.to_le_bytes());
    b.extend_from_slice(&state.capacity.to_le_bytes());
    b.extend_from_slice(state.generation.as_bytes());
    b.push(state.previous);
    b.push(state.current);
    b.push(reason_code(state.began));
    b.extend_from_slice(&[0; 5]);
    b.extend_from_slice(&epoch.to_le_bytes());
    b.extend_from_slice(&(count as u64).to_le_bytes());
    b.extend_from_slice(&state.live);
    b.extend_from_slice(&state.readable);
    let sum = crc(&b);
    b.extend_from_slice(&sum.to_le_bytes());
    b
}

/// The state and its epoch, or what is wrong with the bytes.
pub fn decode_state(b: &[u8]) -> Result<(CbtState, u64), String> {
    if b.len() < STATE_HEADER + 4 {
        return Err(format!("{} bytes, shorter than a header", b.len()));
    }
    if &b[..8] != STATE_MAGIC {
        return Err("not a blksnap tracking state (bad magic)".into());
    }
    let version = u32_at(b, 8);
    if version != VERSION {
        return Err(format!(
            "format version {version}, this daemon reads {VERSION}"
        ));
    }
    let (body, sum) = b.split_at(b.len() - 4);
    if crc(body) != u32_at(sum, 0) {
        return Err("checksum mismatch".into());
    }
    let count = u64_at(b, 56) as usize;
    if count
        .checked_mul(2)
        .and_then(|n| n.checked_add(STATE_HEADER))
        != Some(body.len())
    {
        return Err(format!(
            "{} bytes for maps of {count} blocks",
            body.len() - STATE_HEADER
        ));
    }
    let maps = &body[STATE_HEADER..];
    let state = CbtState {
        block_size: u32_at(b, 12),
        capacity: u64_at(b, 16),
        generation: Uuid::from_bytes(b[24..40].try_into().unwrap()),
        began: reason_of(b[42])?,
        previous: b[40],
        current: b[41],
        live: maps[..count].to_vec(),
        readable: maps[count..].to_vec(),
    };
    Ok((state, u64_at(b, 48)))
}

pub fn encode_journal_header(epoch: u64) -> [u8; JOURNAL_HEADER] {
    let mut h = [0u8; JOURNAL_HEADER];
    h[..8].copy_from_slice(JOURNAL_MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[16..24].copy_from_slice(&epoch.to_le_bytes());
    h[24..28].copy_from_slice(&(RECORD as u32).to_le_bytes());
    let sum = crc(&h[..28]);
    h[28..32].copy_from_slice(&sum.to_le_bytes());
    h
}

/// The journal's epoch, or what is wrong with its header.
pub fn decode_journal_header(h: &[u8]) -> Result<u64, String> {
    if h.len() < JOURNAL_HEADER {
        return Err(format!("{} bytes, shorter than a header", h.len()));
    }
    if &h[..8] != JOURNAL_MAGIC {
        return Err("not a blksnap journal (bad magic)".into());
    }
    let version = u32_at(h, 8);
    if version != VERSION || u32_at(h, 24) as usize != RECORD {
        return Err(format!(
            "journal version {version}, this daemon reads {VERSION}"
        ));
    }
    if crc(&h[..28]) != u32_at(h, 28) {
        return Err("journal header checksum mismatch".into());
    }
    Ok(u64_at(h, 16))
}

/// One change as a 32-byte record: kind, number, 2 reserved, CRC-32 of the
/// other 28 bytes, then 24 bytes of operands.
pub fn encode_record(change: &Change) -> [u8; RECORD] {
    let mut r = [0u8; RECORD];
    match *change {
        Change::Mark {
            first,
            last,
            number,
        }
        | Change::ReadableMark {
            first,
            last,
            number,
        } => {
            r[0] = if matches!(change, Change::Mark { .. }) {
                1
            } else {
                2
            };
            r[1] = number;
            r[8..16].copy_from_slice(&first.to_le_bytes());
            r[16..24].copy_from_slice(&last.to_le_bytes());
        }
        Change::Switch { generation } => {
            r[0] = 3;
            r[8..24].copy_from_slice(generation.as_bytes());
        }
    }
    let sum = record_crc(&r);
    r[4..8].copy_from_slice(&sum.to_le_bytes());
    r
}

fn record_crc(r: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&r[..4]);
    h.update(&r[8..]);
    h.finalize()
}

/// A record, or `None` when it is torn or not a record (the replay ends).
pub fn decode_record(r: &[u8]) -> Option<Change> {
    if r.len() < RECORD || record_crc(r) != u32_at(r, 4) {
        return None;
    }
    let (first, last) = (u64_at(r, 8), u64_at(r, 16));
    match r[0] {
        1 => Some(Change::Mark {
            first,
            last,
            number: r[1],
        }),
        2 => Some(Change::ReadableMark {
            first,
            last,
            number: r[1],
        }),
        3 => Some(Change::Switch {
            generation: Uuid::from_bytes(r[8..24].try_into().unwrap()),
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> CbtState {
        CbtState {
            block_size: 65536,
            capacity: 5 * 65536 - 512,
            generation: Uuid::new_v4(),
            began: GenerationReason::UncleanStop,
            previous: 3,
            current: 4,
            live: vec![0, 4, 2, 3, 1],
            readable: vec![0, 3, 2, 3, 1],
        }
    }

    #[test]
    fn state_round_trips_and_every_flipped_byte_is_caught() {
        let s = state();
        let bytes = encode_state(&s, 77);
        assert_eq!(decode_state(&bytes).unwrap(), (s, 77));
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x10;
            assert!(decode_state(&bad).is_err(), "flip at {i} accepted");
        }
        for len in 0..bytes.len() {
            assert!(decode_state(&bytes[..len]).is_err(), "truncated to {len}");
        }
    }

    #[test]
    fn records_round_trip_and_torn_ones_end_the_replay() {
        let changes = [
            Change::Mark {
                first: 1,
                last: 9,
                number: 4,
            },
            Change::ReadableMark {
                first: 0,
                last: 0,
                number: 3,
            },
            Change::Switch {
                generation: Uuid::new_v4(),
            },
        ];
        for c in &changes {
            let r = encode_record(c);
            assert_eq!(decode_record(&r), Some(*c));
            for i in 0..RECORD {
                let mut bad = r;
                bad[i] ^= 1;
                assert_eq!(decode_record(&bad), None, "flip at {i}");
            }
        }
        assert_eq!(decode_record(&[0; RECORD]), None);
        assert_eq!(decode_journal_header(&encode_journal_header(9)), Ok(9));
    }
}
