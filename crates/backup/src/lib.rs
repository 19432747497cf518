//! blksnap-backup as a library: the repository ([`repo`]), backing up a
//! device image ([`create`]), restoring one ([`restore`]) and serving a
//! backup over NBD ([`serve`]). The binary
//! (`main.rs`) drives them through the daemon's control protocol and NBD.
//! It never links the engine: it is a client like the CLI.

pub mod create;
pub mod repo;
pub mod restore;
pub mod serve;
