//! The bounded pool that runs blocking disk calls off the tokio workers, and the fast path
//! that lets a device run its cheapest calls on the caller's thread.
//!
//! Handing each call to a thread and back costs two context switches, which on a small machine
//! is most of the cost of a 4 KiB write to the page cache (docs/BENCHMARKS.md has the
//! figures).
//! So the pool wakes threads sparingly: a thread that wakes drains the queue before it sleeps
//! again, and another thread is woken only while the calls waiting per awake thread would take
//! longer than [`TARGET_BACKLOG`] to run, judged by how long recent calls took (at most eight
//! per thread), or when every awake thread is stuck in a call that has run longer than that.
//! Sixteen 4 KiB writes to the page cache (a few microseconds each) then cost two wake-ups, not
//! sixteen, while calls to a slow device (a disk, a network file system) spread over up to
//! `limit` threads.
//!
//! [`FastPath`] goes further for calls that are cheap while the kernel keeps up (a buffered
//! write, a read the page cache holds): one at a time per device, and only while that device's
//! recent calls were fast, they run on the caller's thread.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::{BlockError, ErrorKind, Op, Result};

/// Calls that recently took at most this long may run on the caller's thread
/// ([`FastPath`]): handing them to a pool thread would cost more than they do.
pub const INLINE_LIMIT: Duration = Duration::from_micros(20);
/// Largest single sample in a [`FastPath`] average.
const SAMPLE_CAP: Duration = Duration::from_micros(4 * INLINE_LIMIT.as_micros() as u64);
/// How much queued work one awake thread may have before another thread is woken.
pub const TARGET_BACKLOG: Duration = Duration::from_micros(100);
/// Most calls one awake thread may have queued, however fast calls are (a call that turns out
/// slow holds up at most this many behind it until the next submission notices it).
const MAX_JOBS_PER_THREAD: u64 = 8;
/// The duration assumed before any call was measured: two calls per thread, a cautious start.
const INITIAL_JOB_NS: u64 = TARGET_BACKLOG.as_nanos() as u64 / 2;

type Job = Box<dyn FnOnce() + Send>;

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
    /// When each thread's current call started (indexed by thread number; `None` when idle).
    running_since: Vec<Option<Instant>>,
}

impl State {
    /// Calls one awake thread may have queued before another is woken.
    fn jobs_per_thread(&self) -> usize {
        (TARGET_BACKLOG.as_nanos() as u64 / self.job_ns.max(1)).clamp(1, MAX_JOBS_PER_THREAD)
            as usize
    }

    /// Whether the queue is longer than the awake threads should take on, or nothing queued
    /// moves because every thread is stuck in a call that has run longer than the backlog
    /// target (a sync, a cache miss, a hung device).
    fn needs_another_thread(&self) -> bool {
        if self.queue.is_empty() {
            return false;
        }
        if self.queue.len() > self.awake * self.jobs_per_thread() {
            return true;
        }
        let stuck = self
            .running_since
            .iter()
            .flatten()
            .filter(|since| since.elapsed() > TARGET_BACKLOG)
            .count();
        stuck >= self.awake
    }

    fn record(&mut self, took: Duration) {
        self.job_ns = moving_average(self.job_ns, took);
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
            let _ = tx.send(r);
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

    fn submit(&self, job: Job) {
        let shared = &self.handle.0;
        let mut st = shared.lock();
        st.queue.push_back(job);
        wake_if_needed(shared, st);
    }
}

/// Runs a device's cheap calls on the caller's thread while they stay cheap.
///
/// One per device, so that a slow disk is judged by its own calls and not by a fast one that
/// shares the pool; one call at a time, so that a call that stalls (dirty-page throttling, a
/// hung device) holds up one runtime thread while the calls behind it go to the pool; and on a
/// runtime with a single worker, which such a stall would freeze, only when the process has a
/// single CPU, where the pool could not run beside it anyway. Calls that turn out
/// slow raise the device's average, and its calls go to the pool (and are still measured
/// there) until fast ones bring it down again.
#[derive(Debug)]
pub(crate) struct FastPath {
    /// Moving average of the device's calls, in nanoseconds.
    avg_ns: AtomicU64,
    /// A call is running on a caller's thread.
    busy: AtomicBool,
}

impl Default for FastPath {
    fn default() -> Self {
        FastPath {
            avg_ns: AtomicU64::new(INITIAL_JOB_NS),
            busy: AtomicBool::new(false),
        }
    }
}

impl FastPath {
    /// Runs `f` here if the device's calls have been fast and no other call runs here now,
    /// on `pool` otherwise.
    pub async fn run<T, F>(self: &Arc<Self>, pool: &IoPool, op: Op, offset: u64, f: F) -> Result<T>
    where
        F: FnOnce() -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        if self.avg_ns.load(Ordering::Relaxed) <= INLINE_LIMIT.as_nanos() as u64
            && inline_allowed()
            && !self.busy.swap(true, Ordering::Acquire)
        {
            let started = Instant::now();
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            self.record(started.elapsed());
            self.busy.store(false, Ordering::Release);
            return r.unwrap_or_else(|_| {
                Err(BlockError::new(ErrorKind::Io(None), op, offset).context("I/O call panicked"))
            });
        }
        let me = self.clone();
        pool.run(op, offset, move || {
            let started = Instant::now();
            let r = f();
            me.record(started.elapsed());
            r
        })
        .await
    }

    fn record(&self, took: Duration) {
        // A sample counts for at most four times the limit: one call that was merely preempted
        // (on a busy machine the caller shares its core) must not move the device to the pool,
        // while three slow calls in a row (a disk that makes every write wait) do.
        // Racing updates may lose one sample; the average stays an average.
        let old = self.avg_ns.load(Ordering::Relaxed);
        self.avg_ns
            .store(moving_average(old, took.min(SAMPLE_CAP)), Ordering::Relaxed);
    }
}

/// The average of call durations in nanoseconds, over about eight calls: it follows a device
/// that slows down within a burst.
fn moving_average(avg_ns: u64, sample: Duration) -> u64 {
    let ns = sample.as_nanos().min(u64::MAX as u128 / 2) as u64;
    (avg_ns.saturating_mul(7).saturating_add(ns)) / 8
}

/// Whether a call may run on the current tokio worker: the runtime has another worker to go
/// on while this one is busy, or the process has a single CPU (where the runtime has one
/// worker), so that a pool thread could not run beside the worker anyway.
///
/// On one CPU, handing a page-cache write to a pool thread buys no parallelism and costs two
/// context switches; worse, the woken thread tends to preempt the worker at once, so hand-offs
/// go one write at a time and never batch (docs/DESIGN-NOTES.md, "A process with one CPU").
/// The price is that a call that hangs there
/// freezes the whole process, as a crash would: the VM's disk is stuck either way. A frozen
/// secondary is given up on by the primary's link timer; a frozen primary is for the
/// orchestrator to detect (COLO's heartbeat), as the secondary keeps no timer on it.
fn inline_allowed() -> bool {
    static ONE_CPU: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return false;
    };
    inline_allowed_on(rt.runtime_flavor(), rt.metrics().num_workers(), || {
        *ONE_CPU.get_or_init(|| std::thread::available_parallelism().is_ok_and(|n| n.get() == 1))
    })
}

/// [`inline_allowed`] for a runtime of `flavor` with `workers` workers; `one_cpu` is asked
/// only when it matters (it reads the process's CPU affinity and cgroup quota once).
fn inline_allowed_on(
    flavor: tokio::runtime::RuntimeFlavor,
    workers: usize,
    one_cpu: impl FnOnce() -> bool,
) -> bool {
    workers >= 2
        || (workers == 1 && flavor == tokio::runtime::RuntimeFlavor::MultiThread && one_cpu())
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
        let index = st.threads;
        st.threads += 1;
        st.awake += 1;
        st.running_since.push(None);
        let name = format!("coloblk-io-{}", st.threads);
        drop(st);
        let s = shared.clone();
        if std::thread::Builder::new()
            .name(name)
            .spawn(move || worker(&s, index))
            .is_err()
        {
            // No thread: the queued calls wait for an existing one; with none at all they are
            // dropped, which fails them ("I/O pool stopped") rather than leaving them hanging.
            let mut st = shared.lock();
            st.threads -= 1;
            st.awake -= 1;
            st.running_since.pop();
            if st.threads == 0 {
                st.queue.clear();
            }
        }
    }
}

/// A pool thread: takes calls until the queue is empty, then sleeps until woken.
fn worker(shared: &Arc<Shared>, index: usize) {
    let mut st = shared.lock();
    loop {
        if let Some(job) = st.queue.pop_front() {
            let started = Instant::now();
            st.running_since[index] = Some(started);
            drop(st);
            job();
            st = shared.lock();
            st.running_since[index] = None;
            st.record(started.elapsed());
            if st.needs_another_thread() {
                // The calls turned out slower than the queue was sized for: share it out.
                wake_if_needed(shared, st);
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
        st.queue = (0..queued).map(|_| Box::new(|| ()) as Job).collect();
        st
    }

    #[test]
    fn fast_calls_share_one_thread_slow_calls_spread() {
        let page_cache = [Duration::from_micros(4); 32];
        // Eight 4 KiB writes to the page cache: one thread drains them (about 32 us).
        assert!(!state_after(&page_cache, 8, 1).needs_another_thread());
        // Sixteen: two threads, however fast the calls, so that one stuck call holds up few.
        assert!(state_after(&page_cache, 16, 1).needs_another_thread());
        assert!(!state_after(&page_cache, 16, 2).needs_another_thread());
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

    fn on_pool_thread() -> bool {
        std::thread::current()
            .name()
            .is_some_and(|n| n.starts_with("coloblk-io-"))
    }

    /// Runs a call through `fp` that sleeps `sleep`; true if it ran on a pool thread.
    async fn pooled(fp: &Arc<FastPath>, pool: &IoPool, sleep: Duration) -> bool {
        fp.run(pool, Op::Write, 0, move || {
            std::thread::sleep(sleep);
            Ok(on_pool_thread())
        })
        .await
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fast_calls_run_here_slow_ones_move_to_the_pool() {
        let pool = IoPool::new(4);
        let fp = Arc::new(FastPath::default());
        // Nothing measured yet (assumed 50 us a call): the pool.
        assert!(pooled(&fp, &pool, Duration::ZERO).await);
        // Fast calls bring the average down; then they run on the caller's thread.
        for _ in 0..64 {
            pooled(&fp, &pool, Duration::ZERO).await;
        }
        assert!(!pooled(&fp, &pool, Duration::ZERO).await);
        // One slow call runs here (it could not be known) and is taken for a hiccup...
        assert!(!pooled(&fp, &pool, Duration::from_millis(2)).await);
        assert!(!pooled(&fp, &pool, Duration::ZERO).await);
        // ... three in a row for a slow device: the next call goes to the pool.
        for _ in 0..3 {
            pooled(&fp, &pool, Duration::from_millis(2)).await;
        }
        assert!(pooled(&fp, &pool, Duration::ZERO).await);
        // Another device's fast calls do not make this one's calls run here.
        let other = Arc::new(FastPath::default());
        for _ in 0..64 {
            pooled(&other, &pool, Duration::ZERO).await;
        }
        assert!(pooled(&fp, &pool, Duration::ZERO).await);
        // A panic is an error here too.
        for _ in 0..64 {
            pooled(&fp, &pool, Duration::ZERO).await;
        }
        let e = fp
            .run::<(), _>(&pool, Op::Write, 3, || panic!("boom"))
            .await
            .unwrap_err();
        assert_eq!((e.kind, e.offset), (ErrorKind::Io(None), 3));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_call_at_a_time_runs_here() {
        let pool = IoPool::new(4);
        let fp = Arc::new(FastPath::default());
        for _ in 0..64 {
            pooled(&fp, &pool, Duration::ZERO).await;
        }
        // A runs here and waits until B has run; B must not also take a runtime thread.
        let (started_tx, started_rx) = oneshot::channel();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let (a_fp, a_pool) = (fp.clone(), pool.clone());
        let a = tokio::spawn(async move {
            a_fp.run(&a_pool, Op::Write, 0, move || {
                let _ = started_tx.send(());
                release_rx.recv_timeout(Duration::from_secs(10)).unwrap();
                Ok(on_pool_thread())
            })
            .await
            .unwrap()
        });
        started_rx.await.unwrap();
        let b_on_pool = fp
            .run(&pool, Op::Write, 0, move || {
                let on_pool = on_pool_thread();
                release_tx.send(()).unwrap();
                Ok(on_pool)
            })
            .await
            .unwrap();
        assert!(!a.await.unwrap(), "A should have run on a runtime thread");
        assert!(
            b_on_pool,
            "B ran on a runtime thread while A held the fast path"
        );
    }

    #[tokio::test]
    async fn a_current_thread_runtime_never_runs_calls_here() {
        let pool = IoPool::new(2);
        let fp = Arc::new(FastPath::default());
        for _ in 0..64 {
            assert!(pooled(&fp, &pool, Duration::ZERO).await);
        }
    }

    #[test]
    fn one_worker_runs_calls_here_only_on_a_single_cpu() {
        use tokio::runtime::RuntimeFlavor::{CurrentThread, MultiThread};
        assert!(inline_allowed_on(MultiThread, 2, || false));
        assert!(inline_allowed_on(MultiThread, 1, || true));
        assert!(!inline_allowed_on(MultiThread, 1, || false));
        // A current-thread runtime is one thread even on a single CPU: a stall there would
        // also stop whatever drives it (tests, embedders); the pool keeps it going.
        assert!(!inline_allowed_on(CurrentThread, 1, || true));
    }

    #[test]
    fn a_stuck_call_gets_help() {
        let mut st = state_after(&[Duration::from_micros(4); 32], 3, 1);
        // One thread, running a call that started just now: the queue waits for it.
        st.running_since = vec![Some(Instant::now())];
        assert!(!st.needs_another_thread());
        // The same call, a millisecond in (a sync, a cache miss): wake another thread.
        st.running_since = vec![Some(Instant::now() - Duration::from_millis(1))];
        assert!(st.needs_another_thread());
        // Nothing queued: nothing to help with.
        st.queue.clear();
        assert!(!st.needs_another_thread());
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
