//! The requests of one connection on their way from its reader to the
//! threads that run them ([`Pipeline`]), and the server-wide cap on those
//! threads ([`WorkerPermits`]).
//!
//! Workers are started only when a request comes while the ones before it
//! are still running, at most `max_workers` per connection and only while
//! the server has permits left; they end after a while without work. So an
//! idle connection costs its reader thread alone, a thousand connections
//! cost a thousand threads plus the capped workers, and a connection that
//! gets no worker (the server is out of permits) still progresses: its
//! reader runs the request itself. Nothing here knows NBD: a job is run by
//! the connection's `run` function, which answers it.
//!
//! Invariants: a job submitted is run exactly once, by a worker or by the
//! submitting thread; `close` returns only when every submitted job has
//! run and every worker has ended. Called by `transmission.rs`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// Threads that run requests, over every connection of a server.
pub struct WorkerPermits {
    limit: usize,
    used: AtomicUsize,
}

impl WorkerPermits {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(WorkerPermits {
            limit,
            used: AtomicUsize::new(0),
        })
    }

    /// Workers running now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn try_take(self: &Arc<Self>) -> Option<Permit> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.limit).then_some(n + 1)
            })
            .ok()
            .map(|_| Permit(self.clone()))
    }
}

/// One worker's place, given back when it ends.
struct Permit(Arc<WorkerPermits>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.used.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How many workers a connection may have and how long they wait idle.
#[derive(Debug, Clone, Copy)]
pub struct PipelineLimits {
    /// Workers of one connection at most.
    pub max_workers: usize,
    /// Jobs waiting for a worker at most; past it the reader waits.
    pub depth: usize,
    /// A worker without a job for this long ends.
    pub idle_timeout: Duration,
}

struct State<J> {
    queue: VecDeque<J>,
    workers: usize,
    /// Workers waiting for a job.
    idle: usize,
    /// The reader waits for room in the queue, or for the workers to end.
    reader_waiting: bool,
    /// `run` said the connection is gone: take no more jobs.
    broken: bool,
    closed: bool,
}

type Run<J> = Box<dyn Fn(J) -> bool + Send + Sync>;

/// One connection's jobs between its reader and its workers.
pub struct Pipeline<J> {
    state: Mutex<State<J>>,
    /// Signalled for workers: a job, or the close.
    work: Condvar,
    /// Signalled for the reader: room in the queue, or a worker ended.
    room: Condvar,
    run: Run<J>,
    permits: Arc<WorkerPermits>,
    limits: PipelineLimits,
}

impl<J: Send + 'static> Pipeline<J> {
    /// A pipeline whose jobs are run by `run`, which returns false once the
    /// connection is unusable (its reply could not be sent).
    pub fn new(
        run: impl Fn(J) -> bool + Send + Sync + 'static,
        permits: Arc<WorkerPermits>,
        limits: PipelineLimits,
    ) -> Arc<Self> {
        Arc::new(Pipeline {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                workers: 0,
                idle: 0,
                reader_waiting: false,
                broken: false,
                closed: false,
            }),
            work: Condvar::new(),
            room: Condvar::new(),
            run: Box::new(run),
            permits,
            limits,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State<J>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `job` on a worker, started if none is free and the server has
    /// a permit, or on this thread when the connection has no worker at
    /// all. Waits while the queue is full. False once the connection is
    /// unusable: the caller stops reading.
    pub fn submit(self: &Arc<Self>, job: J) -> bool {
        let mut state = self.lock();
        while state.queue.len() >= self.limits.depth && !state.broken {
            state.reader_waiting = true;
            state = self.room.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.reader_waiting = false;
        if state.broken {
            return false;
        }
        if state.idle > state.queue.len() {
            state.queue.push_back(job);
            self.work.notify_one();
            return true;
        }
        if state.workers < self.limits.max_workers {
            if let Some(permit) = self.permits.try_take() {
                state.workers += 1;
                state.queue.push_back(job);
                drop(state);
                let this = self.clone();
                let started = std::thread::Builder::new()
                    .name("nbd-worker".into())
                    .spawn(move || this.work(permit));
                if let Err(e) = started {
                    tracing::warn!(error = %e, "cannot start an NBD worker thread");
                    let mut state = self.lock();
                    state.workers -= 1;
                    if state.workers == 0 {
                        // Nobody else will run what is queued: this thread.
                        let queued: Vec<J> = state.queue.drain(..).collect();
                        drop(state);
                        return queued.into_iter().all(|j| self.run_here(j));
                    }
                }
                return true;
            }
        }
        if state.workers > 0 {
            // A busy worker takes it next.
            state.queue.push_back(job);
            return true;
        }
        drop(state);
        self.run_here(job)
    }

    fn run_here(&self, job: J) -> bool {
        if (self.run)(job) {
            return true;
        }
        self.lock().broken = true;
        false
    }

    fn work(self: Arc<Self>, _permit: Permit) {
        let mut state = self.lock();
        loop {
            if let Some(job) = state.queue.pop_front() {
                if state.reader_waiting {
                    self.room.notify_one();
                }
                drop(state);
                let sent = (self.run)(job);
                state = self.lock();
                if !sent && !state.broken {
                    state.broken = true;
                    self.room.notify_all();
                }
                continue;
            }
            if state.closed {
                break;
            }
            state.idle += 1;
            let (next, waited) = self
                .work
                .wait_timeout(state, self.limits.idle_timeout)
                .unwrap_or_else(|e| e.into_inner());
            state = next;
            state.idle -= 1;
            if waited.timed_out() && state.queue.is_empty() {
                break;
            }
        }
        state.workers -= 1;
        if state.reader_waiting {
            self.room.notify_all();
        }
    }

    /// Takes no more jobs; returns when every job submitted has run and
    /// every worker has ended.
    pub fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        self.work.notify_all();
        while state.workers > 0 {
            state.reader_waiting = true;
            state = self.room.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.reader_waiting = false;
        // Workers take every queued job before they end; a queue left over
        // here would be a job never run.
        debug_assert!(state.queue.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::time::Instant;

    fn limits(max_workers: usize) -> PipelineLimits {
        PipelineLimits {
            max_workers,
            depth: 8,
            idle_timeout: Duration::from_millis(100),
        }
    }

    /// Every job runs exactly once, whatever mix of workers and the
    /// reader's own thread runs them, and close waits for all of them.
    #[test]
    fn every_job_runs_once_and_close_waits_for_them() {
        for (permits, per_connection) in [(0, 4), (1, 4), (8, 4), (8, 1)] {
            let ran: Arc<Vec<AtomicU64>> = Arc::new((0..500).map(|_| AtomicU64::new(0)).collect());
            let r = ran.clone();
            let pipeline = Pipeline::new(
                move |i: usize| {
                    if i % 7 == 0 {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                    r[i].fetch_add(1, Ordering::SeqCst);
                    true
                },
                WorkerPermits::new(permits),
                limits(per_connection),
            );
            for i in 0..500 {
                assert!(pipeline.submit(i));
            }
            pipeline.close();
            for (i, n) in ran.iter().enumerate() {
                assert_eq!(n.load(Ordering::SeqCst), 1, "job {i} ({permits} permits)");
            }
        }
    }

    /// Workers are capped per connection and over the server, give their
    /// permits back when idle, and a job blocked in a worker does not stop
    /// the next one from running on another.
    #[test]
    fn workers_are_capped_and_end_when_idle() {
        let permits = WorkerPermits::new(3);
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let (r, m, g) = (running.clone(), most.clone(), gate.clone());
        let pipeline = Pipeline::new(
            move |blocked: bool| {
                let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(now, Ordering::SeqCst);
                if blocked {
                    let (open, cv) = &*g;
                    let mut open = open.lock().unwrap();
                    while !*open {
                        open = cv.wait(open).unwrap();
                    }
                } else {
                    std::thread::sleep(Duration::from_millis(5));
                }
                r.fetch_sub(1, Ordering::SeqCst);
                true
            },
            permits.clone(),
            limits(2),
        );
        // The first job blocks a worker; the next ones still run.
        assert!(pipeline.submit(true));
        let deadline = Instant::now() + Duration::from_secs(5);
        while running.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline);
            std::thread::yield_now();
        }
        for _ in 0..20 {
            assert!(pipeline.submit(false));
        }
        while most.load(Ordering::SeqCst) < 2 {
            assert!(Instant::now() < deadline, "no second worker ran");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(
            permits.used() <= 2,
            "{} workers for one connection",
            permits.used()
        );
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        // Idle workers end and give their permits back.
        while permits.used() > 0 {
            assert!(
                Instant::now() < deadline + Duration::from_secs(5),
                "idle workers stayed"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        pipeline.close();
        assert!(most.load(Ordering::SeqCst) <= 2);
    }

    /// Once `run` reports the connection gone, submit says so and the
    /// reader stops; close still returns.
    #[test]
    fn a_broken_connection_stops_the_reader() {
        let pipeline = Pipeline::new(|i: u32| i < 3, WorkerPermits::new(2), limits(2));
        let mut accepted = 0;
        for i in 0..1000 {
            if !pipeline.submit(i) {
                break;
            }
            accepted += 1;
            std::thread::sleep(Duration::from_micros(50));
        }
        assert!(
            accepted < 1000,
            "submit never reported the broken connection"
        );
        pipeline.close();
    }
}
