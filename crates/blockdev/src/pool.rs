//! The bounded pool that runs blocking disk calls off the tokio workers.
//!
//! Handing each call to a thread and back costs two context switches, which on a small machine
//! is most of the cost of a 4 KiB write to the page cache (measured: a server doing its writes
//! inline would reach 60% more IOPS than one that hands every write to tokio's blocking pool).
//! So the pool wakes threads sparingly: a thread that wakes drains the queue before it sleeps
//! again, and another thread is woken only while the calls waiting per awake thread would take
//! longer than [`TARGET_BACKLOG`] to run, judged by how long recent calls took. Sixteen 4 KiB
//! writes to the page cache (a few microseconds each) then cost one wake-up, not sixteen, while
//! calls to a slow device (a disk, a network file system) still spread over up to `limit`
//! threads as soon as two of them wait.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::{BlockError, ErrorKind, Op, Result};

/// Calls that recently took at most this long may run on the caller's thread
/// ([`IoPool::run_here_if_fast`]): handing them to a pool thread would cost more than they do.
pub const INLINE_LIMIT: Duration = Duration::from_micros(20);
/// How much queued work one awake thread may have before another thread is woken.
pub const TARGET_BACKLOG: Duration = Duration::from_micros(100);
/// Most calls one awake thread may have queued, however fast calls are.
const MAX_JOBS_PER_THREAD: u64 = 64;
/// The duration assumed before any call was measured: two calls per thread, a cautious start.
const INITIAL_JOB_NS: u64 = TARGET_BACKLOG.as_nanos() as u64 / 2;

/// A call: runs on a pool thread and returns how to hand its result back.
type Job = Box<dyn FnOnce() -> Completion + Send>;
/// Hands a result back (wakes the waiting task).
type Completion = Box<dyn FnOnce() + Send>;

/// Results a thread holds back while it still has queued calls to run, so that a burst of fast
/// calls wakes the waiting tasks' runtime once rather than once per call...
const MAX_HELD: usize = 16;
/// ... but none is held longer than this, which bounds what it adds to a call's latency.
const MAX_HOLD: Duration = Duration::from_micros(30);

#[derive(Default)]
struct State {
    queue: VecDeque<Job>,
    /// Threads not waiting on the condition variable (running a call, or about to look).
    awake: usize,
    /// Threads started so far.
    threads: usize,
    /// Wake-ups granted and not yet taken (makes spurious wake-ups harmless).
    wakeups: usize,
    shutdown: bool,
    /// Moving average of how long a call runs, in nanoseconds.
    job_ns: u64,
}

impl State {
    /// Calls one awake thread may have queued before another is woken.
    fn jobs_per_thread(&self) -> usize {
        (TARGET_BACKLOG.as_nanos() as u64 / self.job_ns.max(1)).clamp(1, MAX_JOBS_PER_THREAD)
            as usize
    }

    /// Whether the queue is longer than the awake threads should take on.
    fn needs_another_thread(&self) -> bool {
        self.queue.len() > self.awake * self.jobs_per_thread()
    }

    fn record(&mut self, took: Duration) {
        let ns = took.as_nanos().min(u64::MAX as u128) as u64;
        // An average over about eight calls: follows a device that slows down within a burst.
        self.job_ns = (self.job_ns * 7 + ns) / 8;
    }
}

struct Shared {
    state: Mutex<State>,
    cond: Condvar,
    limit: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A job never runs under the lock, so a poisoned lock only means a thread died between
        // two plain field updates; the state is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Ends the threads when the last handle is dropped.
struct Handle(Arc<Shared>);

impl Drop for Handle {
    fn drop(&mut self) {
        self.0.lock().shutdown = true;
        self.0.cond.notify_all();
    }
}

/// Runs blocking closures on the pool's own threads, at most `limit` at once.
///
/// Bounding matters: an NBD client with hundreds of requests in flight must not turn into
/// hundreds of threads. Cloning shares the threads and the bound.
#[derive(Clone)]
pub struct IoPool {
    handle: Arc<Handle>,
}

impl std::fmt::Debug for IoPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoPool")
            .field("limit", &self.handle.0.limit)
            .finish()
    }
}

impl Default for IoPool {
    fn default() -> Self {
        IoPool::new(64)
    }
}

impl IoPool {
    /// A pool running at most `limit` calls at once (threads start as needed).
    pub fn new(limit: usize) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                job_ns: INITIAL_JOB_NS,
                ..State::default()
            }),
            cond: Condvar::new(),
            limit: limit.max(1),
        });
        IoPool {
            handle: Arc::new(Handle(shared)),
        }
    }

    /// Runs `f` on a pool thread and waits for it.
    pub async fn run<T, F>(&self, op: Op, offset: u64, f: F) -> Result<T>
    where
        F: FnOnce() -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.submit(Box::new(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            Box::new(move || {
                let _ = tx.send(r);
            })
        }));
        match rx.await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => {
                Err(BlockError::new(ErrorKind::Io(None), op, offset).context("I/O thread panicked"))
            }
            Err(_) => {
                Err(BlockError::new(ErrorKind::Shutdown, op, offset).context("I/O pool stopped"))
            }
        }
    }

    /// Runs `f` right here when the calls measured lately were fast (under [`INLINE_LIMIT`])
    /// and none are waiting for a thread, and on a pool thread otherwise.
    ///
    /// For calls that are fast while the kernel keeps up (a small write to the page cache) and
    /// only sometimes slow: handing a 3 us write to another thread and back costs two context
    /// switches, more than the write. A call that turns out slow raises the average, and the
    /// calls after it go to the pool until fast calls bring it down again, so a device that
    /// stalls holds up the caller's thread for one call, not for every call.
    pub async fn run_here_if_fast<T, F>(&self, op: Op, offset: u64, f: F) -> Result<T>
    where
        F: FnOnce() -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let shared = &self.handle.0;
        let fast = {
            let st = shared.lock();
            st.queue.is_empty() && st.job_ns <= INLINE_LIMIT.as_nanos() as u64
        };
        if !fast {
            return self.run(op, offset, f).await;
        }
        let started = Instant::now();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        shared.lock().record(started.elapsed());
        r.unwrap_or_else(|_| {
            Err(BlockError::new(ErrorKind::Io(None), op, offset).context("I/O call panicked"))
        })
    }

    fn submit(&self, job: Job) {
        let shared = &self.handle.0;
        let mut st = shared.lock();
        st.queue.push_back(job);
        wake_if_needed(shared, st);
    }
}

/// Wakes (or starts) one more thread if the queue is longer than the awake threads should take
/// on. Takes the lock guard so that the notify happens after it is released.
fn wake_if_needed(shared: &Arc<Shared>, mut st: MutexGuard<'_, State>) {
    if !st.needs_another_thread() {
        return;
    }
    if st.awake < st.threads {
        st.awake += 1;
        st.wakeups += 1;
        drop(st);
        shared.cond.notify_one();
    } else if st.threads < shared.limit {
        st.threads += 1;
        st.awake += 1;
        let name = format!("coloblk-io-{}", st.threads);
        drop(st);
        let s = shared.clone();
        if std::thread::Builder::new()
            .name(name)
            .spawn(move || worker(&s))
            .is_err()
        {
            // No thread: the queued calls wait for an existing one; with none at all they are
            // dropped, which fails them ("I/O pool stopped") rather than leaving them hanging.
            let mut st = shared.lock();
            st.threads -= 1;
            st.awake -= 1;
            if st.threads == 0 {
                st.queue.clear();
            }
        }
    }
}

/// A pool thread: takes calls until the queue is empty, then sleeps until woken.
fn worker(shared: &Arc<Shared>) {
    let mut held: Vec<Completion> = Vec::with_capacity(MAX_HELD);
    let mut held_since = Instant::now();
    let mut st = shared.lock();
    loop {
        if let Some(job) = st.queue.pop_front() {
            drop(st);
            let started = Instant::now();
            if held.is_empty() {
                held_since = started;
            }
            held.push(job());
            st = shared.lock();
            st.record(started.elapsed());
            if st.needs_another_thread() {
                // The calls turned out slower than the queue was sized for: share it out.
                wake_if_needed(shared, st);
                st = shared.lock();
            }
            if st.queue.is_empty() || held.len() >= MAX_HELD || held_since.elapsed() >= MAX_HOLD {
                drop(st);
                held.drain(..).for_each(|done| done());
                st = shared.lock();
            }
            continue;
        }
        if st.shutdown {
            st.threads -= 1;
            st.awake -= 1;
            return;
        }
        st.awake -= 1;
        while st.wakeups == 0 && !st.shutdown {
            st = shared.cond.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        if st.wakeups > 0 {
            st.wakeups -= 1;
        } else {
            // Shutdown woke us without a granted wake-up: count ourselves awake again.
            st.awake += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn runs_every_call_and_returns_its_result() {
        let pool = IoPool::new(4);
        let mut tasks = Vec::new();
        for i in 0..200u64 {
            let pool = pool.clone();
            tasks.push(tokio::spawn(async move {
                pool.run(Op::Read, i, move || Ok(i * 2)).await
            }));
        }
        for (i, t) in tasks.into_iter().enumerate() {
            assert_eq!(t.await.unwrap().unwrap(), i as u64 * 2);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slow_calls_spread_over_threads_up_to_the_limit() {
        let pool = IoPool::new(8);
        let running = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let (pool, running, peak) = (pool.clone(), running.clone(), peak.clone());
            tasks.push(tokio::spawn(async move {
                pool.run(Op::Read, 0, move || {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(5));
                    running.fetch_sub(1, Ordering::SeqCst);
                    Ok(())
                })
                .await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let peak = peak.load(Ordering::SeqCst);
        assert!(peak <= 8, "{peak} calls ran at once with a limit of 8");
        assert!(
            peak >= 4,
            "slow calls did not spread over threads (peak {peak})"
        );
    }

    fn state_after(calls: &[Duration], queued: usize, awake: usize) -> State {
        let mut st = State {
            job_ns: INITIAL_JOB_NS,
            awake,
            ..State::default()
        };
        for &c in calls {
            st.record(c);
        }
        st.queue = (0..queued)
            .map(|_| Box::new(|| Box::new(|| ()) as Completion) as Job)
            .collect();
        st
    }

    #[test]
    fn fast_calls_share_one_thread_slow_calls_spread() {
        let page_cache = [Duration::from_micros(4); 32];
        // Sixteen 4 KiB writes to the page cache: one thread drains them (about 64 us).
        assert!(!state_after(&page_cache, 16, 1).needs_another_thread());
        // A burst of 64 would take one thread over 100 us: a second one helps.
        assert!(state_after(&page_cache, 64, 1).needs_another_thread());
        assert!(!state_after(&page_cache, 64, 4).needs_another_thread());
        // A slow device (1 ms a call): the second waiting call wakes another thread.
        let disk = [Duration::from_millis(1); 32];
        assert!(!state_after(&disk, 1, 1).needs_another_thread());
        assert!(state_after(&disk, 2, 1).needs_another_thread());
        // Before anything is measured: two calls per thread.
        assert!(!state_after(&[], 2, 1).needs_another_thread());
        assert!(state_after(&[], 3, 1).needs_another_thread());
        // A device that slows down is noticed within a few calls.
        let mut slowing = page_cache.to_vec();
        slowing.extend([Duration::from_millis(1); 4]);
        assert!(state_after(&slowing, 2, 1).needs_another_thread());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fast_calls_run_here_slow_ones_move_to_the_pool() {
        let pool = IoPool::new(4);
        let on_caller = |pool: IoPool, sleep: Duration| async move {
            pool.run_here_if_fast(Op::Write, 0, move || {
                std::thread::sleep(sleep);
                Ok(std::thread::current().id())
            })
            .await
            .unwrap()
                == std::thread::current().id()
        };
        // Nothing measured yet (assumed 50 us a call): the pool.
        assert!(!on_caller(pool.clone(), Duration::ZERO).await);
        // Fast calls bring the average down; then they run on the caller's thread.
        for _ in 0..64 {
            pool.run(Op::Write, 0, || Ok(())).await.unwrap();
        }
        assert!(on_caller(pool.clone(), Duration::ZERO).await);
        // One slow call runs here (it could not be known), the next goes to the pool.
        assert!(on_caller(pool.clone(), Duration::from_millis(2)).await);
        assert!(!on_caller(pool.clone(), Duration::ZERO).await);
        // A panic is an error here too.
        for _ in 0..64 {
            pool.run(Op::Write, 0, || Ok(())).await.unwrap();
        }
        let e = pool
            .run_here_if_fast::<(), _>(Op::Write, 3, || panic!("boom"))
            .await
            .unwrap_err();
        assert_eq!((e.kind, e.offset), (ErrorKind::Io(None), 3));
    }

    #[tokio::test]
    async fn a_panicking_call_is_an_error_not_a_lost_thread() {
        let pool = IoPool::new(1);
        let e = pool
            .run::<(), _>(Op::Write, 7, || panic!("boom"))
            .await
            .unwrap_err();
        assert_eq!((e.kind, e.offset), (ErrorKind::Io(None), 7));
        assert_eq!(pool.run(Op::Read, 0, || Ok(5)).await.unwrap(), 5);
    }
}
