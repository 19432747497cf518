//! NBD wire constants and the fixed-size parts of its messages, from the
//! public protocol document (fixed newstyle negotiation, structured replies,
//! metadata contexts, extended headers). No I/O here beyond encoding into
//! buffers.

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const CLIENT_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// Option replies.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
pub const REP_ERR_TLS_REQD: u32 = REP_ERR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_ERR | 10;

// NBD_REP_INFO types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TFLAG_SEND_CACHE: u16 = 1 << 10;
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// Commands and their flags.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Extended headers only: `length` is of a payload that follows the header
/// (else it is the length of the export the command acts on).
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// Structured reply chunks.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

// Block status flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;
pub const STATE_DIRTY: u32 = 1 << 0;

// Errors on the wire (fixed values, whatever the host's errno).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Largest option payload accepted during negotiation.
pub const MAX_OPTION_LEN: u32 = 64 << 10;
/// Largest read or write payload (advertised as the maximum block size).
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// Option names for logs.
pub fn option_name(option: u32) -> &'static str {
    match option {
        OPT_EXPORT_NAME => "EXPORT_NAME",
        OPT_ABORT => "ABORT",
        OPT_LIST => "LIST",
        OPT_STARTTLS => "STARTTLS",
        OPT_INFO => "INFO",
        OPT_GO => "GO",
        OPT_STRUCTURED_REPLY => "STRUCTURED_REPLY",
        OPT_LIST_META_CONTEXT => "LIST_META_CONTEXT",
        OPT_SET_META_CONTEXT => "SET_META_CONTEXT",
        OPT_EXTENDED_HEADERS => "EXTENDED_HEADERS",
        _ => "unknown",
    }
}

/// Command names for logs, indexed by command type.
pub const COMMAND_NAMES: [&str; 8] = [
    "READ",
    "WRITE",
    "DISC",
    "FLUSH",
    "TRIM",
    "CACHE",
    "WRITE_ZEROES",
    "BLOCK_STATUS",
];

/// Maps a host errno to the value NBD allows on the wire.
pub fn wire_error(errno: i32) -> u32 {
    match errno {
        1 | 13 => EPERM,
        12 => ENOMEM,
        22 | 34 => EINVAL,
        27 | 28 | 122 => ENOSPC,
        75 => EOVERFLOW,
        95 => ENOTSUP,
        108 => ESHUTDOWN,
        _ => EIO,
    }
}

/// One transmission-phase request header, of either form: compact (28
/// bytes, 32-bit length) or extended (32 bytes, 64-bit length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub length: u64,
}

pub const REQUEST_LEN: usize = 28;
pub const EXTENDED_REQUEST_LEN: usize = 32;

impl Request {
    /// Parses a compact request header; `None` when the magic is wrong.
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Option<Self> {
        (be32(b, 0) == REQUEST_MAGIC).then(|| Request {
            length: be32(b, 24).into(),
            ..Self::common_fields(b)
        })
    }

    /// Parses an extended request header; `None` when the magic is wrong.
    pub fn parse_extended(b: &[u8; EXTENDED_REQUEST_LEN]) -> Option<Self> {
        (be32(b, 0) == EXTENDED_REQUEST_MAGIC).then(|| Request {
            length: be64(b, 24),
            ..Self::common_fields(b)
        })
    }

    /// The fields both forms have at the same place (all but the length).
    fn common_fields(b: &[u8]) -> Self {
        Request {
            flags: u16::from_be_bytes([b[4], b[5]]),
            command: u16::from_be_bytes([b[6], b[7]]),
            cookie: be64(b, 8),
            offset: be64(b, 16),
            length: 0,
        }
    }

    /// The compact header.
    ///
    /// # Panics
    ///
    /// If `length` does not fit its 32 bits: only extended headers can say
    /// more.
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let length = u32::try_from(self.length).expect("a compact request's length fits 32 bits");
        let mut b = [0u8; REQUEST_LEN];
        self.encode_common(&mut b, REQUEST_MAGIC);
        b[24..28].copy_from_slice(&length.to_be_bytes());
        b
    }

    /// The extended header.
    pub fn encode_extended(&self) -> [u8; EXTENDED_REQUEST_LEN] {
        let mut b = [0u8; EXTENDED_REQUEST_LEN];
        self.encode_common(&mut b, EXTENDED_REQUEST_MAGIC);
        b[24..32].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    fn encode_common(&self, b: &mut [u8], magic: u32) {
        b[0..4].copy_from_slice(&magic.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

pub fn simple_reply(error: u32, cookie: u64) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

pub fn chunk_header(flags: u16, kind: u16, cookie: u64, length: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    chunk_start(&mut b, STRUCTURED_REPLY_MAGIC, flags, kind, cookie);
    b[16..20].copy_from_slice(&length.to_be_bytes());
    b
}

/// An extended reply chunk header: `offset` is the request's (whatever
/// offset the payload names), `length` the payload's.
pub fn extended_chunk_header(
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    length: u64,
) -> [u8; 32] {
    let mut b = [0u8; 32];
    chunk_start(&mut b, EXTENDED_REPLY_MAGIC, flags, kind, cookie);
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..32].copy_from_slice(&length.to_be_bytes());
    b
}

/// The fields both chunk header forms start with.
fn chunk_start(b: &mut [u8], magic: u32, flags: u16, kind: u16, cookie: u64) {
    b[0..4].copy_from_slice(&magic.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
}

pub fn option_reply(option: u32, kind: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + payload.len());
    b.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            command: CMD_WRITE,
            cookie: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            length: 4096,
        };
        assert_eq!(Request::parse(&r.encode()), Some(r));
        let mut bad = r.encode();
        bad[0] ^= 1;
        assert_eq!(Request::parse(&bad), None);
    }

    #[test]
    fn extended_request_round_trip() {
        let r = Request {
            flags: CMD_FLAG_PAYLOAD_LEN,
            command: CMD_WRITE_ZEROES,
            cookie: 0x0102_0304_0506_0708,
            offset: 1 << 40,
            length: (5 << 32) | 7,
        };
        let b = r.encode_extended();
        assert_eq!(be32(&b, 0), EXTENDED_REQUEST_MAGIC);
        assert_eq!(be64(&b, 24), r.length);
        assert_eq!(Request::parse_extended(&b), Some(r));
        // Neither form passes for the other.
        let short = Request { length: 4096, ..r };
        assert_eq!(Request::parse(&b[..REQUEST_LEN].try_into().unwrap()), None);
        let mut padded = [0u8; EXTENDED_REQUEST_LEN];
        padded[..REQUEST_LEN].copy_from_slice(&short.encode());
        assert_eq!(Request::parse_extended(&padded), None);
    }

    #[test]
    #[should_panic(expected = "fits 32 bits")]
    fn a_compact_header_cannot_carry_a_64_bit_length() {
        let r = Request {
            flags: 0,
            command: CMD_TRIM,
            cookie: 1,
            offset: 0,
            length: 1 << 32,
        };
        let _ = r.encode();
    }
}
