//! A volume's lane ([`Lane`]): the queue and worker threads that run the
//! I/O requests (read, write, fsync, fallocate) of one volume's open files,
//! so that one volume whose I/O stalls (its difference storage stops
//! answering, a copy-on-write waits) holds up only its own requests. The
//! FUSE threads only read requests from the kernel and queue them here;
//! a worker runs each one and replies (fuser's replies may be sent from
//! any thread).
//!
//! Workers start when a request finds none free, up to `max_workers` per
//! lane, and end after `idle` without work: an idle volume costs no thread.
//! Invariants: every job queued runs exactly once, in a worker or (if no
//! worker can be started and the lane has none) on the caller; a worker
//! ends only with the queue empty, so a queued job always has a worker that
//! will take it. Made per volume by [`crate::fs::VolumeFs`] at open.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

pub type Job = Box<dyn FnOnce() + Send>;

pub struct Lane {
    name: String,
    max_workers: usize,
    idle: Duration,
    state: Mutex<State>,
    work: Condvar,
}

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    workers: usize,
    /// Workers waiting for a job.
    waiting: usize,
}

impl Lane {
    pub fn new(name: &str, max_workers: usize, idle: Duration) -> Arc<Self> {
        Arc::new(Self {
            name: name.to_string(),
            max_workers: max_workers.max(1),
            idle,
            state: Mutex::new(State::default()),
            work: Condvar::new(),
        })
    }

    /// Queues `job`; a waiting worker takes it, else a new one if the lane
    /// has fewer than `max_workers`, else the first worker to finish.
    pub fn submit(self: &Arc<Self>, job: Job) {
        let mut state = self.state.lock().unwrap();
        state.jobs.push_back(job);
        // More jobs than waiting workers: those already woken take the
        // first ones, a new worker the rest.
        if state.waiting >= state.jobs.len() || state.workers >= self.max_workers {
            drop(state);
            self.work.notify_one();
            return;
        }
        state.workers += 1;
        drop(state);
        let lane = self.clone();
        let spawned = std::thread::Builder::new()
            .name("fuse-io".into())
            .spawn(move || lane.work());
        if let Err(e) = spawned {
            tracing::warn!(volume = %self.name, error = %e, "cannot start a FUSE worker thread");
            let mut state = self.state.lock().unwrap();
            state.workers -= 1;
            if state.workers > 0 {
                return;
            }
            // No worker to take it: run the lane's jobs here rather than
            // never.
            let jobs: Vec<Job> = state.jobs.drain(..).collect();
            drop(state);
            jobs.into_iter().for_each(|job| job());
        }
    }

    /// Workers running now.
    #[cfg(test)]
    fn workers(&self) -> usize {
        self.state.lock().unwrap().workers
    }

    fn work(&self) {
        // Reclaim in this thread must not wait for our own devices' I/O.
        blksnap_engine::mark_io_flusher("fuse-io");
        let mut state = self.state.lock().unwrap();
        loop {
            if let Some(job) = state.jobs.pop_front() {
                drop(state);
                job();
                state = self.state.lock().unwrap();
                continue;
            }
            state.waiting += 1;
            let (guard, wait) = self.work.wait_timeout(state, self.idle).unwrap();
            state = guard;
            state.waiting -= 1;
            if wait.timed_out() && state.jobs.is_empty() {
                state.workers -= 1;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::mpsc;
    use std::time::Instant;

    /// Every job runs once, on at most `max_workers` threads at a time.
    #[test]
    fn every_job_runs_once_within_the_worker_cap() {
        let lane = Lane::new("t", 3, Duration::from_millis(50));
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let (done, finished) = mpsc::channel();
        for i in 0..200 {
            let (running, peak, done) = (running.clone(), peak.clone(), done.clone());
            lane.submit(Box::new(move || {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                std::thread::sleep(Duration::from_micros(200));
                running.fetch_sub(1, Ordering::SeqCst);
                done.send(i).unwrap();
            }));
        }
        let mut got: Vec<i32> = (0..200)
            .map(|_| finished.recv_timeout(Duration::from_secs(10)).unwrap())
            .collect();
        got.sort();
        assert_eq!(got, (0..200).collect::<Vec<_>>());
        assert!(finished.try_recv().is_err(), "a job ran twice");
        let peak = peak.load(Ordering::SeqCst);
        assert!((2..=3).contains(&peak), "peak concurrency {peak}");
    }

    /// A job that blocks holds one worker; the next ones still run.
    #[test]
    fn a_blocked_job_does_not_hold_up_the_next() {
        let lane = Lane::new("t", 2, Duration::from_secs(5));
        let (release, blocked) = mpsc::channel::<()>();
        lane.submit(Box::new(move || {
            let _ = blocked.recv();
        }));
        let (done, finished) = mpsc::channel();
        for i in 0..10 {
            let done = done.clone();
            lane.submit(Box::new(move || done.send(i).unwrap()));
        }
        for _ in 0..10 {
            finished.recv_timeout(Duration::from_secs(5)).unwrap();
        }
        release.send(()).unwrap();
    }

    /// Workers end after the idle time and start again for new work.
    #[test]
    fn idle_workers_end_and_come_back() {
        let lane = Lane::new("t", 4, Duration::from_millis(30));
        let (done, finished) = mpsc::channel();
        for _ in 0..8 {
            let done = done.clone();
            lane.submit(Box::new(move || {
                std::thread::sleep(Duration::from_millis(5));
                done.send(()).unwrap();
            }));
        }
        for _ in 0..8 {
            finished.recv_timeout(Duration::from_secs(5)).unwrap();
        }
        assert!(lane.workers() >= 1);
        let deadline = Instant::now() + Duration::from_secs(5);
        while lane.workers() > 0 {
            assert!(Instant::now() < deadline, "idle workers did not end");
            std::thread::sleep(Duration::from_millis(10));
        }
        lane.submit(Box::new(move || done.send(()).unwrap()));
        finished.recv_timeout(Duration::from_secs(5)).unwrap();
    }
}
