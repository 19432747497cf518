//! Fuzzes the option rules in memory (`blksnap_nbd::fuzzing::haggle`: no
//! socket, no thread), so every input runs at memory speed. The first byte
//! picks the server's TLS state (none, offered, required, on); the second,
//! as in `handshake`, a raw stream (even) or a recipe (odd). An
//! acknowledged STARTTLS goes on, as if the TLS handshake had succeeded,
//! with TLS on.
//!
//! Checked on every input, beyond "no panic": the server's bytes are a
//! greeting, then well-framed option replies, then at most the reply to
//! EXPORT_NAME; under required TLS nothing before STARTTLS is answered but
//! with TLS_REQD, or for STARTTLS and ABORT themselves an ACK, INVALID
//! (STARTTLS with data) or TOO_BIG, and no export is entered before TLS.

#![no_main]

mod common;

use std::sync::OnceLock;

use blksnap_nbd::fuzzing::haggle;
use blksnap_nbd::protocol::{
    OPT_ABORT, OPT_STARTTLS, REPLY_MAGIC, REP_ACK, REP_ERR_INVALID, REP_ERR_TLS_REQD,
    REP_ERR_TOO_BIG,
};
use blksnap_nbd::EngineExports;
use libfuzzer_sys::fuzz_target;

fn source() -> &'static EngineExports {
    static SOURCE: OnceLock<EngineExports> = OnceLock::new();
    SOURCE.get_or_init(|| EngineExports(common::engine()))
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fuzz_target!(|data: &[u8]| {
    let [tls, mode, rest @ ..] = data else {
        return;
    };
    let stream = if mode % 2 == 0 {
        rest.to_vec()
    } else {
        common::recipe(rest)
    };
    let run = haggle(source(), *tls, &stream);
    let out = &run.output;
    assert!(out.len() >= 18, "no greeting");
    let required = tls % 4 == 2;
    let mut before_tls = required;
    let mut at = 18;
    while out.len() - at >= 20
        && u64::from_be_bytes(out[at..at + 8].try_into().unwrap()) == REPLY_MAGIC
    {
        let (option, kind, len) = (be32(out, at + 8), be32(out, at + 12), be32(out, at + 16));
        let end = at + 20 + len as usize;
        assert!(end <= out.len(), "an option reply cut short");
        if before_tls {
            let own = option == OPT_STARTTLS || option == OPT_ABORT;
            let allowed = kind == REP_ERR_TLS_REQD
                || (option == OPT_STARTTLS && kind == REP_ERR_INVALID)
                || (own && (kind == REP_ACK || kind == REP_ERR_TOO_BIG));
            assert!(
                allowed,
                "option {option} answered {kind:#x} before required TLS"
            );
            if option == OPT_STARTTLS && kind == REP_ACK {
                before_tls = false;
            }
        }
        at = end;
    }
    let rest = out.len() - at;
    if rest > 0 {
        // Only EXPORT_NAME's reply has no framing: size, flags, maybe zeroes.
        assert!(
            (rest == 10 || rest == 134) && run.outcomes.last() == Some(&"export"),
            "{rest} unframed bytes after the replies ({:?})",
            run.outcomes
        );
    }
    if required {
        assert_ne!(
            run.outcomes[0], "export",
            "an export entered before required TLS"
        );
    }
});
