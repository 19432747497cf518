//! The event queue of one snapshot: `no_space` and `corrupted`, as the
//! original's `snapshot_waitevent` reports them, and `cbt_reset`. Producers are the difference
//! storage and the copy-on-write path; consumers are control-plane waiters.
//!
//! Every event is stamped when it is queued with CLOCK_MONOTONIC in
//! nanoseconds (the clock of the original's `time_label`), so that a waiter
//! that comes late still learns when it happened.

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

/// CLOCK_MONOTONIC now, in nanoseconds.
pub fn monotonic_ns() -> i64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec
        .saturating_mul(1_000_000_000)
        .saturating_add(t.tv_nsec)
}

#[derive(Debug, Default)]
pub(crate) struct EventQueue {
    /// The events with the time each was queued ([`monotonic_ns`]), and
    /// whether the queue is closed.
    queue: Mutex<(VecDeque<(i64, Event)>, bool)>,
    ready: Condvar,
}

impl EventQueue {
    pub fn push(&self, event: Event) {
        tracing::warn!(?event, "snapshot event");
        let time = monotonic_ns();
        self.queue.lock().unwrap().0.push_back((time, event));
        self.ready.notify_all();
    }

    /// Wakes every waiter for good: the snapshot is gone.
    pub fn close(&self) {
        self.queue.lock().unwrap().1 = true;
        self.ready.notify_all();
    }

    /// The oldest event, waiting up to `timeout` for one. `Err(())` when the
    /// queue was closed and is empty.
    #[cfg(test)]
    pub fn wait(&self, timeout: Duration) -> Result<Option<Event>, ()> {
        self.wait_timed(timeout).map(|e| e.map(|(_, event)| event))
    }

    /// As [`Self::wait`], with the time the event was queued
    /// ([`monotonic_ns`]).
    pub fn wait_timed(&self, timeout: Duration) -> Result<Option<(i64, Event)>, ()> {
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
