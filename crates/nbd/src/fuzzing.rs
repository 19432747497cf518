//! Entry points for the fuzz targets (crates/nbd/fuzz), compiled only under
//! cargo-fuzz (`--cfg fuzzing`): option haggling run on bytes in memory, so
//! a target reaches every rule of the handshake (TLS states, extended
//! headers, metadata contexts) at memory speed, without sockets or threads.

use std::io::{self, Read, Write};

use crate::export::ExportSource;
use crate::negotiate::{self, Outcome, TlsState};

/// The client's bytes in, the server's out.
struct Scripted<'a> {
    input: &'a [u8],
    output: Vec<u8>,
}

impl Read for Scripted<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Scripted<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What one handshake over `input` (everything the client sends, its flags
/// first) ended with, and the bytes the server wrote.
pub struct Haggled {
    /// `export`, `starttls`, `leave` or `error`, then the same again for
    /// the part after an acknowledged STARTTLS.
    pub outcomes: Vec<&'static str>,
    pub output: Vec<u8>,
}

/// Runs the greeting and option haggling on `input` as a server in TLS
/// state `tls` (0: no TLS, 1: offered, 2: required, 3: already on). An
/// acknowledged STARTTLS goes on, as if the TLS handshake had succeeded,
/// with the rest of the input and TLS on.
pub fn haggle(source: &dyn ExportSource, tls: u8, input: &[u8]) -> Haggled {
    let state = match tls % 4 {
        0 => TlsState::Unavailable,
        1 => TlsState::Offered,
        2 => TlsState::Required,
        _ => TlsState::Active,
    };
    let mut stream = Scripted {
        input,
        output: Vec::new(),
    };
    let mut outcomes = Vec::new();
    let no_zeroes = match negotiate::greet(&mut stream) {
        Ok(n) => n,
        Err(_) => {
            outcomes.push("error");
            return Haggled {
                outcomes,
                output: stream.output,
            };
        }
    };
    let mut state = state;
    loop {
        let name = match negotiate::haggle(&mut stream, source, state, no_zeroes) {
            Ok(Outcome::Export(_)) => "export",
            Ok(Outcome::StartTls) => "starttls",
            Ok(Outcome::Leave) => "leave",
            Err(_) => "error",
        };
        outcomes.push(name);
        if name != "starttls" {
            break;
        }
        assert!(
            state != TlsState::Active && state != TlsState::Unavailable,
            "STARTTLS acknowledged in state {state:?}"
        );
        state = TlsState::Active;
    }
    Haggled {
        outcomes,
        output: stream.output,
    }
}
