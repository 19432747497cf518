//! The threads that serve one connection ([`Pipeline`]), and the
//! server-wide cap on them ([`WorkerPermits`]).
//!
//! Leader and followers: the connection's reader (its buffered socket and
//! the state needed to read a request) is held by one thread at a time.
//! That thread reads one request, hands the reader on, and then runs the
//! request itself and replies. So no request waits for a hand-off between
//! a reading thread and a running one (at queue depth 1 a reply leaves
//! with no thread switch on its path), and while it runs, another thread
//! already reads the next request: one that stalls does not hold up the
//! ones after it.
//!
//! The reader goes first to the connection's own thread if it waits for
//! it, else to a follower that waits, else to a new follower, started only
//! while the connection has fewer than `max_workers` and the server has
//! permits left. Followers end after `idle_timeout` without the reader.
//! Because the connection's own thread is preferred, an idle connection
//! ends up costing that thread alone. A connection that gets no follower
//! (the server is out of permits) still progresses: each request is read
//! and then run by the same thread, one at a time. Nothing here knows NBD:
//! requests are read by the connection's `read` function and answered by
//! its `run` function.
//!
//! Invariants: at most one thread reads at a time; every request read is
//! run exactly once, by the thread that read it; [`Pipeline::serve`]
//! returns only when the stream has ended and every follower has ended.
//! Called by `transmission.rs`.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// Follower threads, over every connection of a server.
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

    /// Followers running now.
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

/// One follower's place, given back when it ends.
struct Permit(Arc<WorkerPermits>);

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.used.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How many followers a connection may have and how long they wait idle.
#[derive(Debug, Clone, Copy)]
pub struct PipelineLimits {
    /// Followers of one connection at most (beside its own thread).
    pub max_workers: usize,
    /// A follower that waits this long for the reader ends.
    pub idle_timeout: Duration,
}

struct State<R> {
    /// The reader, while no thread reads.
    reader: Option<R>,
    /// Followers started and not yet ended.
    followers: usize,
    /// Followers waiting for the reader.
    followers_waiting: usize,
    /// The connection's own thread waits for the reader.
    own_waiting: bool,
    /// Set once: the stream ended (`Ok`) or failed, or a reply could not
    /// be sent (`Ok`: the client is gone). Nothing is read after it.
    end: Option<io::Result<()>>,
}

/// What a read gave.
pub enum Next<J> {
    /// A request to run.
    Job(J),
    /// The end of the stream.
    End,
    /// Nothing came within the idle time the read was given.
    Idle,
}

type Read<R, J> = Box<dyn Fn(&mut R, Option<Duration>) -> io::Result<Next<J>> + Send + Sync>;
type Run<J> = Box<dyn Fn(J) -> bool + Send + Sync>;

/// One connection's threads and its reader.
pub struct Pipeline<R, J> {
    state: Mutex<State<R>>,
    /// Signalled for the connection's own thread: the reader, the end, or
    /// a follower that ended.
    own_turn: Condvar,
    /// Signalled for followers: the reader, or the end.
    follower_turn: Condvar,
    read: Read<R, J>,
    run: Run<J>,
    permits: Arc<WorkerPermits>,
    limits: PipelineLimits,
}

impl<R: Send + 'static, J: 'static> Pipeline<R, J> {
    /// Serves a connection on the calling thread and its followers:
    /// `read` gives the next request, or the end of the stream, or, when it
    /// is given an idle time, [`Next::Idle`] if nothing came within it (a
    /// follower asks so, to hand the reader back to the connection's own
    /// thread of an idle connection); `run` answers a request, returning false once the connection is unusable
    /// (its reply could not be sent). Returns how the stream ended, and
    /// the reader.
    pub fn serve(
        reader: R,
        read: impl Fn(&mut R, Option<Duration>) -> io::Result<Next<J>> + Send + Sync + 'static,
        run: impl Fn(J) -> bool + Send + Sync + 'static,
        permits: Arc<WorkerPermits>,
        limits: PipelineLimits,
    ) -> (io::Result<()>, R) {
        let pipeline = Arc::new(Pipeline {
            state: Mutex::new(State {
                reader: Some(reader),
                followers: 0,
                followers_waiting: 0,
                own_waiting: false,
                end: None,
            }),
            own_turn: Condvar::new(),
            follower_turn: Condvar::new(),
            read: Box::new(read),
            run: Box::new(run),
            permits,
            limits,
        });
        pipeline.take_turns(None);
        let mut state = pipeline.lock();
        while state.followers > 0 {
            state = pipeline.wait_own(state);
        }
        let end = state.end.take().unwrap_or(Ok(()));
        let reader = state
            .reader
            .take()
            .expect("the reader is given back when the stream ends");
        (end, reader)
    }

    fn lock(&self) -> MutexGuard<'_, State<R>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait_own<'a>(&self, state: MutexGuard<'a, State<R>>) -> MutexGuard<'a, State<R>> {
        self.own_turn.wait(state).unwrap_or_else(|e| e.into_inner())
    }

    /// Reads and runs requests until the end, or for a follower (`permit`)
    /// until it has waited too long for the reader.
    fn take_turns(self: &Arc<Self>, permit: Option<Permit>) {
        let follower = permit.is_some();
        let idle = follower.then_some(self.limits.idle_timeout);
        let mut held = None;
        loop {
            let Some(mut reader) = held.take().or_else(|| self.wait_for_reader(follower)) else {
                break;
            };
            match (self.read)(&mut reader, idle) {
                Ok(Next::Job(job)) => {
                    self.pass_on(reader);
                    if !(self.run)(job) {
                        self.finish(None, Ok(()));
                    }
                }
                Ok(Next::Idle) => match self.hand_home(reader) {
                    Some(reader) => held = Some(reader),
                    None => break,
                },
                Ok(Next::End) => self.finish(Some(reader), Ok(())),
                Err(e) => self.finish(Some(reader), Err(e)),
            }
        }
        if follower {
            let mut state = self.lock();
            state.followers -= 1;
            self.own_turn.notify_one();
        }
    }

    /// The reader, once no other thread has it; `None` at the end, or for
    /// a follower that waited for it longer than the idle timeout.
    fn wait_for_reader(&self, follower: bool) -> Option<R> {
        let mut state = self.lock();
        loop {
            if state.end.is_some() {
                return None;
            }
            if let Some(reader) = state.reader.take() {
                return Some(reader);
            }
            if follower {
                state.followers_waiting += 1;
                let (next, waited) = self
                    .follower_turn
                    .wait_timeout(state, self.limits.idle_timeout)
                    .unwrap_or_else(|e| e.into_inner());
                state = next;
                state.followers_waiting -= 1;
                if waited.timed_out() && state.reader.is_none() {
                    return None;
                }
            } else {
                state.own_waiting = true;
                state = self.wait_own(state);
                state.own_waiting = false;
            }
        }
    }

    /// Gives the reader to the next thread: the connection's own if it
    /// waits, a waiting follower, or a new one if the limits allow; else
    /// it waits for this thread to come back for it.
    fn pass_on(self: &Arc<Self>, reader: R) {
        let mut state = self.lock();
        state.reader = Some(reader);
        if state.end.is_some() {
            return;
        }
        if state.own_waiting {
            self.own_turn.notify_one();
            return;
        }
        if state.followers_waiting > 0 {
            self.follower_turn.notify_one();
            return;
        }
        if state.followers >= self.limits.max_workers {
            return;
        }
        let Some(permit) = self.permits.try_take() else {
            return;
        };
        state.followers += 1;
        drop(state);
        let this = self.clone();
        let started = std::thread::Builder::new()
            .name("nbd-worker".into())
            .spawn(move || {
                crate::mark_io_flusher("nbd-worker");
                this.take_turns(Some(permit))
            });
        if let Err(e) = started {
            tracing::warn!(error = %e, "cannot start an NBD worker thread");
            self.lock().followers -= 1;
        }
    }

    /// A follower's reader of a connection idle for a while: given to the
    /// connection's own thread if that waits for it (`None`: the follower
    /// ends), else kept, so that the requests are still read while the
    /// own thread runs one.
    fn hand_home(&self, reader: R) -> Option<R> {
        let mut state = self.lock();
        if !state.own_waiting && state.end.is_none() {
            return Some(reader);
        }
        state.reader = Some(reader);
        self.own_turn.notify_one();
        None
    }

    /// Records the end (the first one counts), gives the reader back if
    /// this thread had it, and wakes every thread so that they end too.
    fn finish(&self, reader: Option<R>, end: io::Result<()>) {
        let mut state = self.lock();
        if reader.is_some() {
            state.reader = reader;
        }
        if state.end.is_none() {
            state.end = Some(end);
        }
        self.own_turn.notify_all();
        self.follower_turn.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::atomic::AtomicU64;
    use std::time::Instant;

    fn limits(max_workers: usize) -> PipelineLimits {
        PipelineLimits {
            max_workers,
            idle_timeout: Duration::from_millis(100),
        }
    }

    /// A reader over a list of jobs, then the end.
    fn jobs<J>(list: impl IntoIterator<Item = J>) -> VecDeque<J> {
        list.into_iter().collect()
    }

    fn next<J>(queue: &mut VecDeque<J>, _: Option<Duration>) -> io::Result<Next<J>> {
        Ok(queue.pop_front().map_or(Next::End, Next::Job))
    }

    type Feed<J> = std::sync::mpsc::Receiver<Option<J>>;

    /// A reader fed by the test, as a socket is by a client: `None` ends
    /// the stream; an idle time is honoured like a poll on the socket.
    fn fed<J>(rx: &mut Feed<J>, idle: Option<Duration>) -> io::Result<Next<J>> {
        let got = match idle {
            None => rx.recv().unwrap(),
            Some(t) => match rx.recv_timeout(t) {
                Ok(got) => got,
                Err(_) => return Ok(Next::Idle),
            },
        };
        Ok(got.map_or(Next::End, Next::Job))
    }

    type FedServer<J> = std::thread::JoinHandle<(io::Result<()>, Feed<J>)>;

    /// A connection served on a thread of its own, its requests fed by
    /// the test through the returned sender (`None` ends the stream).
    fn serve_fed<J: Send + 'static>(
        run: impl Fn(J) -> bool + Send + Sync + 'static,
        permits: Arc<WorkerPermits>,
        limits: PipelineLimits,
    ) -> (std::sync::mpsc::Sender<Option<J>>, FedServer<J>) {
        let (feed, incoming) = std::sync::mpsc::channel::<Option<J>>();
        let server =
            std::thread::spawn(move || Pipeline::serve(incoming, fed, run, permits, limits));
        (feed, server)
    }

    /// Every job runs exactly once, whatever mix of followers and the
    /// connection's own thread runs them, and serve returns only after
    /// all of them.
    #[test]
    fn every_job_runs_once_and_serve_waits_for_them() {
        for (permits, per_connection) in [(0, 4), (1, 4), (8, 4), (8, 1)] {
            let ran: Arc<Vec<AtomicU64>> = Arc::new((0..500).map(|_| AtomicU64::new(0)).collect());
            let r = ran.clone();
            let (end, left) = Pipeline::serve(
                jobs(0..500usize),
                next,
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
            end.unwrap();
            assert!(left.is_empty());
            for (i, n) in ran.iter().enumerate() {
                assert_eq!(n.load(Ordering::SeqCst), 1, "job {i} ({permits} permits)");
            }
        }
    }

    /// A read error ends the connection: serve returns it, after the jobs
    /// read before it have run.
    #[test]
    fn a_read_error_is_returned_after_the_jobs_before_it() {
        let ran = Arc::new(AtomicU64::new(0));
        let r = ran.clone();
        let (end, _) = Pipeline::serve(
            jobs([Ok(1u64), Ok(2), Err(()), Ok(4)]),
            |q: &mut VecDeque<Result<u64, ()>>, _| match q.pop_front() {
                Some(Ok(j)) => Ok(Next::Job(j)),
                Some(Err(())) => Err(io::Error::other("bad magic")),
                None => Ok(Next::End),
            },
            move |j| {
                std::thread::sleep(Duration::from_millis(20));
                r.fetch_add(j, Ordering::SeqCst);
                true
            },
            WorkerPermits::new(4),
            limits(4),
        );
        assert_eq!(end.unwrap_err().to_string(), "bad magic");
        assert_eq!(
            ran.load(Ordering::SeqCst),
            3,
            "jobs 1 and 2 ran, 4 was never read"
        );
    }

    /// Followers are capped per connection and over the server, give their
    /// permits back when idle, and a job blocked in one thread does not
    /// stop the next one from running on another.
    #[test]
    fn followers_are_capped_and_end_when_idle() {
        let permits = WorkerPermits::new(3);
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        // Job 0 blocks until the gate opens; the reader then offers 20
        // short jobs, and waits (as an idle socket would) until the test
        // has seen the idle followers end.
        let (r, m, g) = (running.clone(), most.clone(), gate.clone());
        let (feed, server) = serve_fed(
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
        feed.send(Some(true)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while running.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline);
            std::thread::yield_now();
        }
        for _ in 0..20 {
            feed.send(Some(false)).unwrap();
        }
        while most.load(Ordering::SeqCst) < 2 {
            assert!(Instant::now() < deadline, "no second thread ran a job");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(
            permits.used() <= 2,
            "{} followers for one connection",
            permits.used()
        );
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        // Idle followers end and give their permits back, while a thread
        // still waits in `read`.
        while permits.used() > 0 {
            assert!(
                Instant::now() < deadline + Duration::from_secs(5),
                "idle followers stayed"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        feed.send(None).unwrap();
        server.join().unwrap().0.unwrap();
        assert!(most.load(Ordering::SeqCst) <= 3);
    }

    /// An idle connection ends with its own thread holding the reader: the
    /// followers that read before it all end.
    #[test]
    fn an_idle_connection_keeps_only_its_own_thread() {
        let permits = WorkerPermits::new(8);
        let (feed, server) = serve_fed(
            |_: u32| {
                std::thread::sleep(Duration::from_millis(2));
                true
            },
            permits.clone(),
            limits(4),
        );
        // Bursts of overlapping jobs start followers; between bursts one
        // thread waits in read: in the end it must be the connection's own.
        for burst in 0..5 {
            for j in 0..8 {
                feed.send(Some(burst * 8 + j)).unwrap();
            }
            std::thread::sleep(Duration::from_millis(30));
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while permits.used() > 0 {
            assert!(
                Instant::now() < deadline,
                "a follower kept the reader of an idle connection"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        feed.send(None).unwrap();
        server.join().unwrap().0.unwrap();
    }

    /// Once `run` reports the connection gone, nothing more is read and
    /// serve returns.
    #[test]
    fn a_broken_connection_stops_the_reading() {
        let read = Arc::new(AtomicU64::new(0));
        let counted = read.clone();
        let (end, _) = Pipeline::serve(
            (),
            move |_: &mut (), _| {
                std::thread::sleep(Duration::from_micros(50));
                Ok(Next::Job(counted.fetch_add(1, Ordering::SeqCst)))
            },
            |i: u64| i < 3,
            WorkerPermits::new(2),
            limits(2),
        );
        end.unwrap();
        let n = read.load(Ordering::SeqCst);
        assert!(n < 100, "{n} requests read after the connection broke");
    }
}
