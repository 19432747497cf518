//! The blksnap daemon as a library: configuration ([`config`]), the control
//! service that maps protocol requests onto the engine ([`service`]), and
//! the control socket server ([`control`]), the files it makes outside
//! the state dir ([`files`]), the opening of client-named paths with the
//! client's rights ([`rights`]), and the persistent state
//! ([`state`]: attached devices and change maps in the state dir). The `blksnapd` binary wires them
//! together with signal handling; tests can run a daemon in-process.

pub mod config;
pub mod control;
pub mod files;
pub mod freeze;
pub mod rights;
pub mod service;
pub mod state;
