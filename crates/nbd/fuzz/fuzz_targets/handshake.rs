//! Fuzzes the option haggling (and whatever transmission follows it)
//! through the public API only: one in-process server on a Unix socket,
//! serving the engine of `common::engine`, with TLS offered (a certificate
//! made by openssl at start), so STARTTLS is acknowledged and what follows
//! goes to the TLS handshake. Each input is everything a client says after
//! the server's greeting; the client then closes its side and the server
//! must end the connection within seconds, without a panic in any of its
//! threads (libfuzzer-sys aborts on any panic), whatever it answered.
//!
//! An input whose first byte is even is sent as it is; otherwise the rest is
//! a recipe for a well-framed stream (see `common::recipe`) that gets past
//! the magic numbers, so the fuzzer reaches the option payload parsers, the
//! metadata contexts, extended headers and the transmission phase. The
//! option rules themselves are fuzzed faster, in memory, by `options`.

#![no_main]

mod common;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use blksnap_nbd::protocol::{IHAVEOPT, NBDMAGIC};
use blksnap_nbd::{NbdLimits, NbdServer, NbdSettings, NbdTls, TlsMode};
use common::recipe;
use libfuzzer_sys::fuzz_target;

struct Served {
    socket: PathBuf,
    _server: Arc<NbdServer>,
}

/// A self-signed certificate and its key, made in `dir`.
fn certificate(dir: &std::path::Path) -> (PathBuf, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let made = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", "/CN=localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl (scripts/install-deps installs it)");
    assert!(
        made.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&made.stderr)
    );
    (cert, key)
}

fn served() -> &'static Served {
    static SERVED: OnceLock<Served> = OnceLock::new();
    SERVED.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("blksnap-nbd-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = certificate(&dir);
        let tls = NbdTls::load(TlsMode::On, &cert, &key, None).unwrap();
        let settings = NbdSettings {
            limits: NbdLimits::default(),
            tls: Some(tls),
        };
        let server = NbdServer::with_limits(common::engine(), settings);
        let socket = dir.join("nbd.sock");
        server.listen_unix(&socket).unwrap();
        Served {
            socket,
            _server: server,
        }
    })
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
