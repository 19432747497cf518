//! The event queue of one snapshot: `no_space` and `corrupted`, as the
//! original's `snapshot_waitevent` reports them, and `cbt_reset`. Producers are the difference
//! storage and the copy-on-write path; consumers are control-plane waiters.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::cbt::GenerationReason;
use crate::sync::{wait_until, Condvar, Mutex};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The difference storage needs this many more sectors and cannot grow
    /// (limit reached, or a fixed storage): append ranges or expect overflow.
    NoSpace { requested_sectors: u64 },
    /// The image of `device` became invalid; `errno` says why (ENOSPC for an
    /// overflow, EIO for an I/O error, ETIMEDOUT for a copy timeout).
    Corrupted { device: String, errno: i32 },
    /// The take is the first of a new change-tracking generation of
    /// `device`: an incremental backup against an earlier one is impossible.
    CbtReset {
        device: String,
        reason: GenerationReason,
    },
}

#[derive(Debug, Default)]
pub(crate) struct EventQueue {
    queue: Mutex<(VecDeque<Event>, bool)>,
    ready: Condvar,
}

impl EventQueue {
    pub fn push(&self, event: Event) {
        tracing::warn!(?event, "snapshot event");
        self.queue.lock().unwrap().0.push_back(event);
        self.ready.notify_all();
    }

    /// Wakes every waiter for good: the snapshot is gone.
    pub fn close(&self) {
        self.queue.lock().unwrap().1 = true;
        self.ready.notify_all();
    }

    /// The oldest event, waiting up to `timeout` for one. `Err(())` when the
    /// queue was closed and is empty.
    pub fn wait(&self, timeout: Duration) -> Result<Option<Event>, ()> {
        // A timeout too long to add to the clock waits for an event only.
        let deadline = Instant::now().checked_add(timeout);
        let mut guard = self.queue.lock().unwrap();
        loop {
            if let Some(event) = guard.0.pop_front() {
                return Ok(Some(event));
            }
            if guard.1 {
                return Err(());
            }
            let (next, expired) = wait_until(&self.ready, &self.queue, guard, deadline);
            guard = next;
            if expired && guard.0.is_empty() && !guard.1 {
                return Ok(None);
            }
        }
    }
}
