//! The engine's synchronisation primitives, through one door: `std` in
//! production, shuttle's under the `shuttle` feature, so that the schedule
//! checker (`tests/schedules.rs`) controls every lock, condition wait, atomic
//! access and thread of the chunk state machine and explores their
//! interleavings. Every engine module takes its locks, atomics and threads
//! from here, never from `std::sync` directly.
//!
//! Timed waits go through [`wait_until`]: under shuttle time does not pass,
//! so a timed wait is modelled as a yield that either reports a spurious
//! wake-up or the deadline, chosen by the checker; callers re-check their
//! condition after every wake-up, as with any condition variable.

use std::time::Instant;

#[cfg(not(feature = "shuttle"))]
pub(crate) use std::sync::{atomic, mpsc, Condvar, Mutex, MutexGuard, RwLock, RwLockWriteGuard};
#[cfg(not(feature = "shuttle"))]
pub(crate) use std::thread;

#[cfg(feature = "shuttle")]
pub(crate) use shuttle::sync::{
    atomic, mpsc, Condvar, Mutex, MutexGuard, RwLock, RwLockWriteGuard,
};
#[cfg(feature = "shuttle")]
pub(crate) use shuttle::thread;

/// Waits on `cv` (releasing `guard`, a guard of `mutex`) until a
/// notification or `deadline`; `None` waits for a notification only. Returns
/// the guard and whether the deadline has passed. May return early without
/// either (a spurious wake-up): callers loop on their condition.
#[cfg(not(feature = "shuttle"))]
pub(crate) fn wait_until<'a, T>(
    cv: &Condvar,
    _mutex: &'a Mutex<T>,
    guard: MutexGuard<'a, T>,
    deadline: Option<Instant>,
) -> (MutexGuard<'a, T>, bool) {
    let Some(deadline) = deadline else {
        return (cv.wait(guard).unwrap(), false);
    };
    let now = Instant::now();
    if now >= deadline {
        return (guard, true);
    }
    let (guard, _) = cv.wait_timeout(guard, deadline - now).unwrap();
    (guard, Instant::now() >= deadline)
}

#[cfg(feature = "shuttle")]
pub(crate) fn wait_until<'a, T>(
    cv: &Condvar,
    mutex: &'a Mutex<T>,
    guard: MutexGuard<'a, T>,
    deadline: Option<Instant>,
) -> (MutexGuard<'a, T>, bool) {
    use shuttle::rand::Rng;
    if deadline.is_none() {
        return (cv.wait(guard).unwrap(), false);
    }
    drop(guard);
    thread::yield_now();
    let expired = shuttle::rand::thread_rng().gen_bool(0.2);
    (mutex.lock().unwrap(), expired)
}
