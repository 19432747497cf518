//! The NBD frontend: serves exports over Unix and TCP sockets, with
//! structured replies, block status for `base:allocation`, and change maps
//! as `qemu:dirty-bitmap:since-N` contexts. What it serves is an
//! [`ExportSource`]: with the feature `engine` (default), every tracked
//! device (read-write, export name = the device name) and every snapshot
//! image (`snapshot/<device>`) of an engine; the backup tool serves its
//! repository's points in time read-only. Translates the protocol into
//! export calls and nothing else; the daemon owns its lifetime.
//!
//! Each connection gets a thread for the handshake and request reading, and
//! up to four workers while its requests overlap, capped over the server
//! (`pipeline`). Shutdown stops accepting and closes the
//! read side of every connection: requests already read still complete and
//! are answered. It never goes through a path or a connect: it shuts the
//! listening sockets themselves down, which ends their accept loops even
//! when the Unix socket file was removed under us, and it removes that file
//! only while it is still the one we bound (another server's may be there).

//!
//! The crate also holds an NBD client ([`client`]). The engine is behind
//! the default feature `engine`; the backup tool turns it off and links the
//! client and the server without it.

pub mod client;
#[cfg(feature = "engine")]
mod engine_export;
pub mod export;
#[cfg(fuzzing)]
#[doc(hidden)]
pub mod fuzzing;
mod negotiate;
mod pipeline;
pub mod protocol;
mod server;
mod tls;
mod transmission;

pub use client::{NbdAddress, NbdClient};
#[cfg(feature = "engine")]
pub use engine_export::EngineExports;
pub use export::{ChangeMap, Export, ExportError, ExportResult, ExportSource, ZeroFlags};
pub use server::*;
pub use tls::{check_tcp_exposure, tls_from_options, NbdTls, NbdTlsClient, TlsMode};

/// Puts the calling thread in the `IO_FLUSHER` state (`PR_SET_IO_FLUSHER`):
/// memory reclaim in a thread that serves a block device's I/O must not
/// wait for that I/O. Called by the connection and worker threads. The
/// engine's `mark_io_flusher` does the same; this crate builds without the
/// engine too. Needs `CAP_SYS_RESOURCE`: one warning per process (as root,
/// a debug line otherwise) when refused.
pub(crate) fn mark_io_flusher(role: &str) {
    use std::sync::atomic::{AtomicBool, Ordering};
    static WARNED: AtomicBool = AtomicBool::new(false);
    let Err(e) = rustix::process::configure_io_flusher_behavior(true) else {
        return;
    };
    if WARNED.swap(true, Ordering::Relaxed) {
        return;
    }
    if rustix::process::geteuid().is_root() {
        tracing::warn!(
            thread = role,
            error = %e,
            "cannot mark NBD threads as I/O flushers (PR_SET_IO_FLUSHER needs \
             CAP_SYS_RESOURCE): memory reclaim in them may wait for their own I/O"
        );
    } else {
        tracing::debug!(thread = role, error = %e, "NBD threads not marked as I/O flushers");
    }
}
