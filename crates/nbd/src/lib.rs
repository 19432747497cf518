//! The NBD frontend: serves every tracked device (read-write, export name =
//! the device name) and every snapshot image (`snapshot/<device>`) of an
//! [`Engine`] over Unix and TCP sockets, with structured replies, block
//! status for `base:allocation`, and the change maps as
//! `qemu:dirty-bitmap:since-N` contexts on images. Translates the protocol
//! into engine calls and nothing else; the daemon owns its lifetime.
//!
//! Each connection gets a thread for the handshake and request reading, and
//! a few workers ([`transmission`]). Shutdown stops accepting and closes the
//! read side of every connection: requests already read still complete and
//! are answered. It never goes through a path or a connect: it shuts the
//! listening sockets themselves down, which ends their accept loops even
//! when the Unix socket file was removed under us, and it removes that file
//! only while it is still the one we bound (another server's may be there).

//!
//! The crate also holds an NBD client ([`client`]). The server and the
//! engine it links are behind the default feature `server`; a client-only
//! user (the backup tool) turns it off.

pub mod client;
pub mod protocol;

#[cfg(feature = "server")]
mod export;
#[cfg(feature = "server")]
mod negotiate;
#[cfg(feature = "server")]
mod server;
#[cfg(feature = "server")]
mod transmission;

pub use client::{NbdAddress, NbdClient};
#[cfg(feature = "server")]
pub use server::*;
