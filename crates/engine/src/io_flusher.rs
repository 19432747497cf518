//! Marks the threads that serve block I/O with `PR_SET_IO_FLUSHER`: memory
//! reclaim that runs in such a thread does no I/O of its own (its
//! allocations are `GFP_NOIO`) and is not throttled as a writer. Our loop
//! devices and NBD clients write back through these threads; if reclaim in
//! one of them waited for that writeback, it would wait for itself.
//!
//! Called at the start of every thread that serves I/O: the FUSE threads and
//! per-volume workers (blksnap-fuse), the NBD connection and worker threads
//! (blksnap-nbd has its own copy, being independent of the engine), and the
//! engine's copier and storage growth threads. The flag is per thread and
//! inherited by the threads it starts. It needs `CAP_SYS_RESOURCE`; without
//! it the thread runs unmarked and one warning per process says so (a debug
//! line when not root, where that is expected).

use std::sync::atomic::{AtomicBool, Ordering};

/// Puts the calling thread in the `IO_FLUSHER` state; `role` names it in
/// the warning when the kernel refuses.
pub fn mark_io_flusher(role: &str) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    let Err(e) = rustix::process::configure_io_flusher_behavior(true) else {
        return;
    };
    if WARNED.swap(true, Ordering::Relaxed) {
        return;
    }
    // Expected of a user's process (the engine in a test, a tool): only
    // root is told, where it means a missing capability.
    if rustix::process::geteuid().is_root() {
        tracing::warn!(
            thread = role,
            error = %e,
            "cannot mark I/O threads as I/O flushers (PR_SET_IO_FLUSHER needs \
             CAP_SYS_RESOURCE): memory reclaim in them may wait for their own I/O"
        );
    } else {
        tracing::debug!(thread = role, error = %e, "I/O threads not marked as I/O flushers");
    }
}
