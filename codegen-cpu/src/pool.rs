//! A small persistent fork-join pool for the kernels' row-parallel loops.
//!
//! The training loop calls ~8 kernels per step of a few microseconds each, so the fork-join
//! overhead has to be far below a microsecond. Workers therefore spin for a while after each
//! job (where they pick up the next one within ~100 ns) before they park on a condition
//! variable. The submitting thread works too, and takes every part nobody else has claimed:
//! it never waits for a parked worker to wake up, only for parts already running. With one
//! thread there are no workers and a job is a plain loop on the caller.
//!
//! On an oversubscribed machine a worker can lose its core in the middle of a part, and the
//! job then waits for the scheduler (milliseconds). When the submitter waited much longer
//! than its own share took, the next [`BACKOFF_JOBS`] jobs run on the submitter alone (twice
//! as many after each further stall in a row, up to [`MAX_BACKOFF_JOBS`]).
//!
//! The point is a small fixed cost per job: an empty job costs a fraction of what
//! `rayon::join` costs, and a plain loop on a 1-thread pool (`examples/pool_overhead.rs`;
//! figures in `docs/MEASUREMENTS.md`).

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a worker spins for the next job before it parks.
const SPIN: Duration = Duration::from_micros(200);

/// A wait for workers this much longer than the submitter's own work counts as a stall.
const STALL_GRACE: Duration = Duration::from_micros(20);

/// Jobs run on the submitting thread alone after a stall (doubling while stalls repeat).
const BACKOFF_JOBS: u32 = 64;

/// The longest run of inline jobs after repeated stalls.
const MAX_BACKOFF_JOBS: u32 = 16 * 1024;

/// The type-erased job the workers see: a part function on the submitter's stack.
struct JobDesc<'a> {
    f: &'a (dyn Fn(usize) + Sync),
}

struct Shared {
    /// The current job, or null; points into the submitter's stack frame.
    job: AtomicPtr<JobDesc<'static>>,
    /// Bumped for every job, so a spinning worker notices a new one.
    epoch: AtomicU64,
    /// The next unclaimed part of the current job.
    next: AtomicUsize,
    /// The number of parts of the current job.
    parts: AtomicUsize,
    /// Workers between "I saw a job" and "I am done with it".
    in_job: AtomicUsize,
    /// Workers parked (or about to park) on `cv`.
    sleeping: AtomicUsize,
    /// A worker's part panicked.
    panicked: AtomicBool,
    shutdown: AtomicBool,
    lock: Mutex<()>,
    cv: Condvar,
}

/// A fork-join pool of `threads - 1` workers plus the submitting thread.
pub struct Pool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    submit: Mutex<()>,
    threads: usize,
    /// Jobs still to run inline after a worker stalled.
    backoff: AtomicU32,
    /// The inline run that the next stall sets.
    backoff_len: AtomicU32,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("threads", &self.threads)
            .finish()
    }
}

impl Pool {
    /// A pool running jobs on `threads` threads (the caller and `threads - 1` workers).
    pub fn new(threads: usize) -> std::io::Result<Pool> {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            job: AtomicPtr::new(std::ptr::null_mut()),
            epoch: AtomicU64::new(0),
            next: AtomicUsize::new(0),
            parts: AtomicUsize::new(0),
            in_job: AtomicUsize::new(0),
            sleeping: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            lock: Mutex::new(()),
            cv: Condvar::new(),
        });
        let mut workers = Vec::with_capacity(threads - 1);
        for i in 1..threads {
            let s = Arc::clone(&shared);
            let handle = std::thread::Builder::new()
                .name(format!("sparsejit-cpu-{i}"))
                .spawn(move || worker(&s));
            match handle {
                Ok(h) => workers.push(h),
                Err(e) => {
                    let pool = Pool {
                        shared,
                        workers,
                        submit: Mutex::new(()),
                        threads,
                        backoff: AtomicU32::new(0),
                        backoff_len: AtomicU32::new(BACKOFF_JOBS),
                    };
                    drop(pool); // stops the workers started so far
                    return Err(e);
                }
            }
        }
        Ok(Pool {
            shared,
            workers,
            submit: Mutex::new(()),
            threads,
            backoff: AtomicU32::new(0),
            backoff_len: AtomicU32::new(BACKOFF_JOBS),
        })
    }

    /// The number of threads a job runs on.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f(0), …, f(parts - 1)`, each exactly once, spread over the pool's threads, and
    /// returns when all have finished. A panic in a part is re-raised here.
    pub fn run(&self, parts: usize, f: &(dyn Fn(usize) + Sync)) {
        if parts == 0 {
            return;
        }
        if self.workers.is_empty() || parts == 1 {
            (0..parts).for_each(f);
            return;
        }
        // Another thread is running a job on this pool: do this one alone.
        let Ok(_submit) = self.submit.try_lock() else {
            (0..parts).for_each(f);
            return;
        };
        if self.backoff.load(Relaxed) > 0 {
            self.backoff.fetch_sub(1, Relaxed);
            (0..parts).for_each(f);
            return;
        }
        let s = &*self.shared;
        let desc = JobDesc { f };
        s.next.store(0, SeqCst);
        s.parts.store(parts, SeqCst);
        s.panicked.store(false, SeqCst);
        // Publishing a pointer to a stack frame: `Finish` below (also run on unwinding)
        // withdraws it and waits until no worker holds it before this frame is left.
        let ptr = &desc as *const JobDesc<'_> as *mut JobDesc<'static>;
        s.job.store(ptr, SeqCst);
        s.epoch.fetch_add(1, SeqCst);
        if s.sleeping.load(SeqCst) > 0 {
            let _g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
            s.cv.notify_all();
        }
        struct Finish<'a>(&'a Shared);
        impl Drop for Finish<'_> {
            fn drop(&mut self) {
                let s = self.0;
                s.next.store(usize::MAX / 2, SeqCst);
                s.job.store(std::ptr::null_mut(), SeqCst);
                let start = Instant::now();
                while s.in_job.load(SeqCst) != 0 {
                    if start.elapsed() > Duration::from_micros(50) {
                        std::thread::yield_now();
                    } else {
                        std::hint::spin_loop();
                    }
                }
            }
        }
        let finish = Finish(s);
        let start = Instant::now();
        loop {
            let i = s.next.fetch_add(1, SeqCst);
            if i >= parts {
                break;
            }
            f(i);
        }
        let own = start.elapsed();
        drop(finish);
        // Waiting far longer than our own share means a worker lost its core in the middle
        // of a part (an oversubscribed machine): run the next jobs inline for a while.
        let waited = start.elapsed() - own;
        if waited > own + STALL_GRACE {
            // Doubles with every stall in a row, up to `MAX_BACKOFF_JOBS`.
            let len = self.backoff_len.load(Relaxed);
            self.backoff.store(len, Relaxed);
            self.backoff_len
                .store((len * 2).min(MAX_BACKOFF_JOBS), Relaxed);
        } else {
            self.backoff_len.store(BACKOFF_JOBS, Relaxed);
        }
        if s.panicked.load(SeqCst) {
            panic!("a part of a parallel kernel panicked on a worker thread");
        }
    }

    /// Runs `f` on every element of `items`, each on exactly one thread.
    pub fn for_each_mut<T: Send>(&self, items: &mut [T], f: &(dyn Fn(&mut T) + Sync)) {
        struct Base<T>(*mut T);
        // SAFETY: the pointer is only used to hand out `&mut items[i]` for distinct `i`
        // (below), and `T: Send` lets those references move to other threads.
        unsafe impl<T: Send> Sync for Base<T> {}
        let n = items.len();
        let base = Base(items.as_mut_ptr());
        let base = &base;
        self.run(n, &move |i| {
            // SAFETY: `run` calls this exactly once for each `i < n`, so the references
            // are in bounds and never alias; `items` is borrowed mutably for the whole call.
            let item = unsafe { &mut *base.0.add(i) };
            f(item);
        });
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, SeqCst);
        self.shared.epoch.fetch_add(1, SeqCst);
        {
            let _g = self.shared.lock.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.cv.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn worker(s: &Shared) {
    // The epoch when the pool was created (not when this thread started: jobs, or the
    // shutdown, may already have been published).
    let mut seen = 0;
    loop {
        // Wait for a new epoch: spin first, then park.
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            if s.epoch.load(SeqCst) != seen {
                break;
            }
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(64) && start.elapsed() > SPIN {
                let mut g = s.lock.lock().unwrap_or_else(|e| e.into_inner());
                s.sleeping.fetch_add(1, SeqCst);
                while s.epoch.load(SeqCst) == seen && !s.shutdown.load(SeqCst) {
                    g = s.cv.wait(g).unwrap_or_else(|e| e.into_inner());
                }
                s.sleeping.fetch_sub(1, SeqCst);
                break;
            }
            std::hint::spin_loop();
        }
        seen = s.epoch.load(SeqCst);
        if s.shutdown.load(SeqCst) {
            return;
        }
        s.in_job.fetch_add(1, SeqCst);
        let ptr = s.job.load(SeqCst);
        if !ptr.is_null() {
            // SAFETY: a non-null `job` seen after incrementing `in_job` stays alive until
            // `in_job` drops back: the submitter withdraws the pointer and then waits for
            // `in_job == 0` before leaving the frame that holds it (sequentially consistent
            // operations on both sides make one of them see the other).
            let desc = unsafe { &*ptr };
            let parts = s.parts.load(SeqCst);
            loop {
                let i = s.next.fetch_add(1, SeqCst);
                if i >= parts {
                    break;
                }
                let r: Result<(), Box<dyn Any + Send>> =
                    catch_unwind(AssertUnwindSafe(|| (desc.f)(i)));
                if r.is_err() {
                    s.panicked.store(true, SeqCst);
                }
            }
        }
        s.in_job.fetch_sub(1, SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn every_part_runs_exactly_once() {
        for threads in [1, 2, 3] {
            let pool = Pool::new(threads).unwrap();
            for parts in [0, 1, 2, 5, 64] {
                for _ in 0..50 {
                    let counts: Vec<AtomicUsize> =
                        (0..parts).map(|_| AtomicUsize::new(0)).collect();
                    pool.run(parts, &|i| {
                        counts[i].fetch_add(1, SeqCst);
                    });
                    assert!(counts.iter().all(|c| c.load(SeqCst) == 1));
                }
            }
        }
    }

    #[test]
    fn parked_workers_wake_up_and_mut_parts_are_disjoint() {
        let pool = Pool::new(2).unwrap();
        let mut items = vec![0usize; 7];
        pool.for_each_mut(&mut items, &|x| *x += 1);
        std::thread::sleep(SPIN * 3); // the worker parks
        pool.for_each_mut(&mut items, &|x| *x += 10);
        assert_eq!(items, vec![11; 7]);
    }

    #[test]
    fn concurrent_submitters_are_serialised_or_inline() {
        let pool = Arc::new(Pool::new(2).unwrap());
        let total = Arc::new(AtomicUsize::new(0));
        let hs: Vec<_> = (0..3)
            .map(|_| {
                let (pool, total) = (Arc::clone(&pool), Arc::clone(&total));
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        pool.run(4, &|_| {
                            total.fetch_add(1, SeqCst);
                        });
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(total.load(SeqCst), 3 * 200 * 4);
    }

    #[test]
    fn a_panicking_part_is_reported() {
        let pool = Pool::new(2).unwrap();
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.run(8, &|i| {
                if i == 5 {
                    panic!("part 5");
                }
            })
        }));
        assert!(r.is_err());
        // The pool still works afterwards.
        let n = AtomicUsize::new(0);
        pool.run(8, &|_| {
            n.fetch_add(1, SeqCst);
        });
        assert_eq!(n.load(SeqCst), 8);
    }
}
