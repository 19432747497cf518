//! Fuzzes the transmission request parsers: `Request::parse` never panics on
//! any 28 bytes, nor `Request::parse_extended` on any 32, each accepts
//! exactly the headers with its magic, and whatever it accepts `encode()`
//! (`encode_extended()`) turns back into the same bytes. The rest of the
//! input drives the reply encoders, which must frame what they are given
//! exactly.

#![no_main]

use blksnap_nbd::protocol::{
    chunk_header, extended_chunk_header, option_reply, simple_reply, wire_error, Request, EINVAL,
    EIO, ENOMEM, ENOSPC, ENOTSUP, EOVERFLOW, EPERM, ESHUTDOWN, EXTENDED_REPLY_MAGIC,
    EXTENDED_REQUEST_LEN, EXTENDED_REQUEST_MAGIC, REPLY_MAGIC, REQUEST_LEN, REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC,
};
use libfuzzer_sys::fuzz_target;

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

fuzz_target!(|data: &[u8]| {
    let Some((header, rest)) = data.split_first_chunk::<REQUEST_LEN>() else {
        return;
    };
    match Request::parse(header) {
        Some(request) => {
            assert_eq!(&request.encode(), header, "encode() of {request:?}");
            assert_eq!(Request::parse(&request.encode()), Some(request));
            assert_eq!(be32(header, 0), REQUEST_MAGIC);
            assert_eq!(request.cookie, be64(header, 8));
            assert_eq!(request.offset, be64(header, 16));
            assert_eq!(request.length, u64::from(be32(header, 24)));
        }
        None => assert_ne!(be32(header, 0), REQUEST_MAGIC),
    }
    if let Some((wide, _)) = data.split_first_chunk::<EXTENDED_REQUEST_LEN>() {
        match Request::parse_extended(wide) {
            Some(request) => {
                assert_eq!(
                    &request.encode_extended(),
                    wide,
                    "encode_extended() of {request:?}"
                );
                assert_eq!(be32(wide, 0), EXTENDED_REQUEST_MAGIC);
                assert_eq!(request.cookie, be64(wide, 8));
                assert_eq!(request.offset, be64(wide, 16));
                assert_eq!(request.length, be64(wide, 24));
            }
            None => assert_ne!(be32(wide, 0), EXTENDED_REQUEST_MAGIC),
        }
    }

    // The reply encoders, driven by the header's fields and the tail.
    let errno = be32(header, 4) as i32;
    let wire = wire_error(errno);
    assert!([EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN].contains(&wire));
    let cookie = be64(header, 8);
    let simple = simple_reply(wire, cookie);
    assert_eq!(be32(&simple, 0), SIMPLE_REPLY_MAGIC);
    assert_eq!(be32(&simple, 4), wire);
    assert_eq!(be64(&simple, 8), cookie);
    let (flags, kind) = (header[4] as u16, header[5] as u16);
    let chunk = chunk_header(flags, kind, cookie, be32(header, 24));
    assert_eq!(be32(&chunk, 0), STRUCTURED_REPLY_MAGIC);
    assert_eq!(be64(&chunk, 8), cookie);
    assert_eq!(be32(&chunk, 16), be32(header, 24));
    let wide = extended_chunk_header(flags, kind, cookie, be64(header, 16), be64(header, 8));
    assert_eq!(be32(&wide, 0), EXTENDED_REPLY_MAGIC);
    assert_eq!(be64(&wide, 8), cookie);
    assert_eq!(be64(&wide, 16), be64(header, 16));
    assert_eq!(be64(&wide, 24), be64(header, 8));
    let reply = option_reply(be32(header, 16), be32(header, 20), rest);
    assert_eq!(reply.len(), 20 + rest.len());
    assert_eq!(be64(&reply, 0), REPLY_MAGIC);
    assert_eq!(be32(&reply, 16) as usize, rest.len());
    assert_eq!(&reply[20..], rest);
});
