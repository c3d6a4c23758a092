//! The thread pool the kernels split their work over.
//!
//! Why not rayon: waking a sleeping rayon worker costs more than a decode-sized matmul (measured: one
//! thread decoded as fast as two), and candle's pool spins on a barrier until every thread arrives, which
//! collapses when another process holds a core. This pool sits between the two:
//!
//! - a job is a count of independent chunks; the caller and the workers claim chunks from one atomic
//!   counter, so a worker that the OS has descheduled never holds up chunks it has not claimed: the others
//!   take them;
//! - between jobs a worker spins for a bounded time (`SPIN`, far shorter than a scheduler slice), then
//!   sleeps on a condition variable, so back-to-back matmuls of a decode step find it awake and an idle
//!   or contended pool costs no CPU;
//! - only one caller uses the workers at a time; a second concurrent caller runs its job on its own thread
//!   rather than wait;
//! - when another process takes a core, a worker can be descheduled holding a chunk it claimed, and the
//!   caller then waits up to a scheduler slice for it. When that wait is longer than the caller's own
//!   share of the job (the job would have been faster on one thread), the pool runs jobs on the calling
//!   thread alone for a while (`Backoff`), doubling the time while stalls keep happening, and tries the
//!   workers again afterwards. Large jobs (prefill) rarely trip it; a decode step's ~200 small jobs do.

use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker keeps polling for the next job before it sleeps.
const SPIN: Duration = Duration::from_micros(300);
/// A wait for the workers shorter than this is never taken for a stall.
const STALL_MIN: Duration = Duration::from_micros(200);
/// The first and the longest time jobs run on the calling thread alone after a stall.
const INLINE_FIRST: Duration = Duration::from_millis(20);
const INLINE_MAX: Duration = Duration::from_secs(1);

/// A fixed set of worker threads; the calling thread works too, so `threads` counts it.
pub struct Pool {
    threads: usize,
    shared: Arc<Shared>,
    submit: Mutex<Backoff>,
    workers: Vec<JoinHandle<()>>,
}

/// When the workers last stalled a job, and for how long jobs run on the calling thread because of it.
#[derive(Default)]
struct Backoff {
    /// Jobs run on the calling thread alone until then.
    inline_until: Option<Instant>,
    /// The length of the last inline period (zero: no recent stall).
    period: Duration,
}

impl Backoff {
    fn inline_now(&mut self, now: Instant) -> bool {
        match self.inline_until {
            Some(until) if now < until => true,
            Some(until) => {
                // A clean stretch as long as the period forgets the stall history.
                if now.duration_since(until) > self.period * 2 {
                    self.period = Duration::ZERO;
                    self.inline_until = None;
                }
                false
            }
            None => false,
        }
    }

    /// The caller spent `own` on its share of a job and `waited` for the workers afterwards.
    fn record(&mut self, now: Instant, own: Duration, waited: Duration) {
        if waited > STALL_MIN && waited > own {
            self.period = (self.period * 2).clamp(INLINE_FIRST, INLINE_MAX);
            self.inline_until = Some(now + self.period);
            tracing::debug!(?waited, ?own, period = ?self.period, "kernel pool stalled; running inline");
        }
    }
}

struct Shared {
    /// Bumped (under `state`'s lock) each time a job is published.
    generation: AtomicUsize,
    state: Mutex<State>,
    wake: Condvar,
    shutdown: AtomicBool,
}

struct State {
    job: Option<Arc<Job>>,
    sleeping: usize,
}

/// One call's chunks. `task` points at the caller's closure, which outlives every call of it: the caller
/// returns only once `unfinished` is zero, and a chunk index is only ever run after being claimed below
/// `count`, so a worker holding a finished job's `Arc` never calls `task` again.
struct Job {
    task: *const (dyn Fn(usize) + Sync),
    count: usize,
    next: AtomicUsize,
    unfinished: AtomicUsize,
    panicked: AtomicBool,
}

// SAFETY: `task` is a `Sync` closure, called through a shared reference only while its caller waits.
unsafe impl Send for Job {}
unsafe impl Sync for Job {}

impl Job {
    /// Claim and run chunks until none are left.
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.count {
                return;
            }
            // SAFETY: see the struct comment; `i < count` and this chunk is not yet counted finished.
            let task = unsafe { &*self.task };
            if panic::catch_unwind(AssertUnwindSafe(|| task(i))).is_err() {
                self.panicked.store(true, Ordering::Relaxed);
            }
            self.unfinished.fetch_sub(1, Ordering::Release);
        }
    }
}

impl Pool {
    /// A pool of `threads` threads in all (the caller plus `threads - 1` workers).
    pub fn new(threads: usize) -> Self {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            generation: AtomicUsize::new(0),
            state: Mutex::new(State {
                job: None,
                sleeping: 0,
            }),
            wake: Condvar::new(),
            shutdown: AtomicBool::new(false),
        });
        let mut workers = Vec::with_capacity(threads - 1);
        for i in 1..threads {
            let shared = Arc::clone(&shared);
            let spawned = std::thread::Builder::new()
                .name(format!("pai-kernel-{i}"))
                .spawn(move || worker(&shared));
            match spawned {
                Ok(handle) => workers.push(handle),
                Err(e) => {
                    tracing::warn!(error = %e, "could not start a kernel thread; using fewer");
                    break;
                }
            }
        }
        Self {
            threads: workers.len() + 1,
            shared,
            submit: Mutex::new(Backoff::default()),
            workers,
        }
    }

    /// Threads that work on a job, the caller included.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Run `task(0)`, …, `task(count - 1)`, spread over the pool; returns when all have run.
    pub fn run(&self, count: usize, task: &(dyn Fn(usize) + Sync)) {
        if count <= 1 || self.threads == 1 {
            (0..count).for_each(task);
            return;
        }
        let mut turn = match self.submit.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            // Another thread is using the workers: do this job here rather than queue behind it.
            Err(TryLockError::WouldBlock) => {
                (0..count).for_each(task);
                return;
            }
        };
        if turn.inline_now(Instant::now()) {
            (0..count).for_each(task);
            return;
        }
        // SAFETY (lifetime erasure): the job never calls `task` after `unfinished` reaches zero, and we
        // wait for that below before returning (see `Job`).
        let task: *const (dyn Fn(usize) + Sync + '_) = task;
        let task: *const (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(task) };
        let job = Arc::new(Job {
            task,
            count,
            next: AtomicUsize::new(0),
            unfinished: AtomicUsize::new(count),
            panicked: AtomicBool::new(false),
        });
        {
            let mut state = lock(&self.shared.state);
            state.job = Some(Arc::clone(&job));
            self.shared.generation.fetch_add(1, Ordering::Release);
            if state.sleeping > 0 {
                self.shared.wake.notify_all();
            }
        }
        let started = Instant::now();
        job.work();
        let own_done = Instant::now();
        let mut polls = 0u32;
        while job.unfinished.load(Ordering::Acquire) != 0 {
            // A worker is finishing a chunk it claimed; if it was descheduled, give it the core.
            polls += 1;
            if polls < 1 << 12 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        lock(&self.shared.state).job = None;
        let now = Instant::now();
        turn.record(now, own_done - started, now - own_done);
        if job.panicked.load(Ordering::Relaxed) {
            panic!("a kernel task panicked on a pool thread");
        }
    }

    /// Split `out` into consecutive pieces of `piece` elements (the last may be shorter) and run
    /// `task(index, piece)` for each, spread over the pool.
    pub fn for_each_piece<T: Send>(
        &self,
        out: &mut [T],
        piece: usize,
        task: impl Fn(usize, &mut [T]) + Sync,
    ) {
        let piece = piece.max(1);
        let len = out.len();
        let base = SendPtr(out.as_mut_ptr());
        self.run(len.div_ceil(piece), &|i| {
            let start = i * piece;
            let end = (start + piece).min(len);
            // SAFETY: each index is run exactly once and the pieces of distinct indices are disjoint
            // ranges of `out`, which is mutably borrowed for the whole call.
            let slice =
                unsafe { std::slice::from_raw_parts_mut(base.get().add(start), end - start) };
            task(i, slice);
        });
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        {
            let _state = lock(&self.shared.state);
            self.shared.generation.fetch_add(1, Ordering::Release);
            self.shared.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

struct SendPtr<T>(*mut T);
// SAFETY: used only to hand disjoint pieces of one slice to the pool's threads (`for_each_piece`).
unsafe impl<T: Send> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    fn get(&self) -> *mut T {
        self.0
    }
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn worker(shared: &Shared) {
    let mut seen = 0;
    loop {
        // 1. Wait for a new generation: poll for a while, then sleep.
        let started = Instant::now();
        let mut polls = 0u32;
        loop {
            let g = shared.generation.load(Ordering::Acquire);
            if g != seen {
                seen = g;
                break;
            }
            polls += 1;
            if !polls.is_multiple_of(64) || started.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            let mut state = lock(&shared.state);
            state.sleeping += 1;
            while shared.generation.load(Ordering::Acquire) == seen {
                state = shared.wake.wait(state).unwrap_or_else(|p| p.into_inner());
            }
            state.sleeping -= 1;
        }
        if shared.shutdown.load(Ordering::Acquire) {
            return;
        }
        // 2. Work on the current job, if it is not already over.
        let job = lock(&shared.state).job.clone();
        if let Some(job) = job {
            job.work();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_chunk_runs_once_whatever_the_thread_count() {
        for threads in [1, 2, 3, 8] {
            let pool = Pool::new(threads);
            for count in [0, 1, 2, 7, 1000] {
                let hits: Vec<AtomicUsize> = (0..count).map(|_| AtomicUsize::new(0)).collect();
                pool.run(count, &|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
            }
        }
    }

    #[test]
    fn a_stall_runs_jobs_inline_for_a_doubling_period_that_a_clean_stretch_resets() {
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        let mut b = Backoff::default();
        assert!(!b.inline_now(t0));
        // A short wait, or one shorter than the caller's own share, is no stall.
        b.record(t0, ms(5), Duration::from_micros(100));
        b.record(t0, ms(5), ms(4));
        assert!(!b.inline_now(t0));
        // Waiting longer than the caller worked: inline for the first period.
        b.record(t0, ms(1), ms(3));
        assert!(b.inline_now(t0 + ms(19)));
        assert!(!b.inline_now(t0 + ms(21)));
        // Stalling again soon after doubles it.
        b.record(t0 + ms(25), ms(1), ms(3));
        assert!(b.inline_now(t0 + ms(25) + ms(39)));
        assert!(!b.inline_now(t0 + ms(25) + ms(41)));
        // A clean stretch twice the period long forgets the history.
        assert!(!b.inline_now(t0 + ms(25) + ms(40) + ms(81)));
        b.record(t0 + ms(200), ms(1), ms(3));
        assert!(!b.inline_now(t0 + ms(200) + ms(21)));
        // The period never exceeds the maximum.
        for _ in 0..20 {
            b.record(t0, ms(1), ms(3));
        }
        assert_eq!(b.period, INLINE_MAX);
    }

    #[test]
    fn pieces_cover_the_slice() {
        let pool = Pool::new(3);
        let mut out = vec![0usize; 1001];
        pool.for_each_piece(&mut out, 10, |i, piece| {
            for (k, o) in piece.iter_mut().enumerate() {
                *o = i * 10 + k;
            }
        });
        assert!(out.iter().enumerate().all(|(i, &o)| i == o));
    }

    #[test]
    fn concurrent_callers_and_sleeping_workers_all_finish() {
        let pool = Arc::new(Pool::new(2));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let pool = Arc::clone(&pool);
                std::thread::spawn(move || {
                    let mut total = 0;
                    for round in 0..200 {
                        if round % 50 == 0 {
                            // Let the worker fall asleep so the wake-up path runs too.
                            std::thread::sleep(SPIN * 3);
                        }
                        let sum = AtomicUsize::new(0);
                        pool.run(16, &|i| {
                            sum.fetch_add(i, Ordering::Relaxed);
                        });
                        total += sum.load(Ordering::Relaxed);
                    }
                    total
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), 200 * 120);
        }
    }

    #[test]
    fn a_panicking_task_is_reported_to_the_caller() {
        let pool = Pool::new(2);
        let result = panic::catch_unwind(AssertUnwindSafe(|| {
            pool.run(64, &|i| {
                if i == 63 {
                    panic!("boom");
                }
            })
        }));
        assert!(result.is_err());
        // The pool still works afterwards.
        let sum = AtomicUsize::new(0);
        pool.run(4, &|i| {
            sum.fetch_add(i, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 6);
    }
}
