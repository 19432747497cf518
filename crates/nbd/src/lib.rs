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
