//! The copier pool ([`CopierPool`]): a few threads that run the chunk copies
//! of snapshots that have a copy timeout, so that a writer can stop waiting
//! for a copy when its timeout passes while the copy itself, which may be
//! stuck in I/O, finishes on a pool thread and settles the chunk's state.
//!
//! Bounded: a fixed number of threads per engine, whatever the number of
//! copies in flight (more copies queue); no copy spawns a thread of its own.
//! The threads end when the pool is dropped (with the engine and the last
//! snapshot that uses it). Made by the engine at the first take with a copy
//! timeout; used by [`crate::snapshot`].

use std::sync::Arc;

use crate::sync::{mpsc, thread, Mutex};

/// Threads in the pool: copies are I/O-bound, and a few stuck copies must
/// not hold up the others.
pub(crate) const COPIER_THREADS: usize = 4;

type Job = Box<dyn FnOnce() + Send>;

pub(crate) struct CopierPool {
    jobs: Mutex<mpsc::Sender<Job>>,
}

impl std::fmt::Debug for CopierPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CopierPool")
    }
}

impl CopierPool {
    pub fn new(threads: usize) -> Self {
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        for i in 0..threads {
            let queue = queue.clone();
            let spawned = thread::Builder::new()
                .name(format!("blksnap-copier-{i}"))
                .spawn(move || {
                    // Copies write the difference storage for a device's
                    // writer, possibly in the kernel's writeback.
                    crate::mark_io_flusher("blksnap-copier");
                    loop {
                        // The lock is held only to take a job, not to run it.
                        let job = queue.lock().unwrap().recv();
                        match job {
                            Ok(job) => job(),
                            Err(_) => break,
                        }
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a copier thread");
            }
        }
        Self {
            jobs: Mutex::new(jobs),
        }
    }

    /// Queues a copy; it runs as soon as a pool thread is free.
    pub fn run(&self, job: Job) {
        if let Err(mpsc::SendError(job)) = self.jobs.lock().unwrap().send(job) {
            // No thread left to run it (none could start): run it here,
            // without a timeout rather than never.
            job();
        }
    }
}
