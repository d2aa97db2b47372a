//! Memory for payloads, and how it is shared fairly between connections.
//!
//! ```text
//!   PayloadBudget (one per server, or shared by servers through a cloned ServerConfig)
//!   +-- a quarter: allowances of 256 KiB, one per connection while they last
//!   |     a connection's requests that fit in its allowance never wait for anyone
//!   +-- the rest: shared, first come first served, for what does not fit
//!
//!   taken before a write payload is read / before a read runs; given back when the write is
//!   applied / the read reply has been sent
//! ```
//!
//! A client that never reads its replies, or stops half-way through a write payload, holds
//! what it took until it goes away. Its own bounds (`ConnBudget`) keep that finite and its
//! allowance keeps the others' small requests moving; so that it cannot keep the shared part
//! from everyone's larger requests, a connection that holds budget and has moved no byte for
//! the stall timeout while another request waits for budget is closed (`Activity` tells a
//! stalled client from a slow one).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::proto::MAX_PAYLOAD;

/// Bytes of request and reply payloads that a server may hold in memory at once, shared by all
/// its connections. Clones share the same budget.
#[derive(Clone)]
pub struct PayloadBudget(Arc<Shared>);

struct Shared {
    /// The part that is first come, first served.
    common: Arc<Semaphore>,
    /// Allowances not handed to a connection yet.
    allowances: Arc<Semaphore>,
    total: usize,
    /// Requests waiting for the common part right now.
    waiting: AtomicUsize,
    in_use: AtomicUsize,
    peak: AtomicUsize,
}

impl PayloadBudget {
    /// The default: 256 MiB; eight maximal (32 MiB) requests, or about 4,000 of 64 KiB.
    pub const DEFAULT_BYTES: usize = 256 << 20;
    /// Each connection's allowance (while allowances last): what a virtual machine typically
    /// has in flight, so that its I/O does not wait for other clients.
    pub const ALLOWANCE: usize = 256 << 10;
    /// The smallest budget: the common part must hold a maximal request.
    pub const MIN_BYTES: usize = 2 * MAX_PAYLOAD as usize;

    /// A budget of `bytes` (at least [`PayloadBudget::MIN_BYTES`]), a quarter of it set aside as
    /// allowances.
    pub fn new(bytes: usize) -> Self {
        let total = bytes.clamp(Self::MIN_BYTES, Semaphore::MAX_PERMITS);
        let allowances = total / 4 / Self::ALLOWANCE;
        PayloadBudget(Arc::new(Shared {
            common: Arc::new(Semaphore::new(total - allowances * Self::ALLOWANCE)),
            allowances: Arc::new(Semaphore::new(allowances)),
            total,
            waiting: AtomicUsize::new(0),
            in_use: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
        }))
    }

    /// The size of the budget.
    pub fn total(&self) -> usize {
        self.0.total
    }

    /// Bytes held right now.
    pub fn in_use(&self) -> usize {
        self.0.in_use.load(Ordering::Relaxed)
    }

    /// The most bytes held at once since the budget was made.
    pub fn peak(&self) -> usize {
        self.0.peak.load(Ordering::Relaxed)
    }

    /// Whether some request is waiting for budget now.
    pub(super) fn is_short(&self) -> bool {
        self.0.waiting.load(Ordering::Acquire) > 0
    }

    /// A new connection's allowance; empty once every allowance is handed out.
    pub(super) fn allowance(&self) -> Allowance {
        let slot = self.0.allowances.clone().try_acquire_owned().ok();
        Allowance {
            size: if slot.is_some() { Self::ALLOWANCE } else { 0 },
            used: Arc::new(AtomicUsize::new(0)),
            _slot: slot,
        }
    }

    /// Takes `bytes` (at most [`MAX_PAYLOAD`]): from the connection's allowance if they fit,
    /// else from the common part, waiting in line while it is spent. Dropping the lease gives
    /// them back.
    pub(super) async fn acquire(&self, allowance: &Allowance, bytes: usize) -> Lease {
        let bytes = bytes.min(MAX_PAYLOAD as usize);
        let from = if allowance.try_take(bytes) {
            Source::Allowance(allowance.used.clone())
        } else {
            Source::Common {
                _permit: self.acquire_common(bytes as u32).await,
            }
        };
        let now = self.0.in_use.fetch_add(bytes, Ordering::AcqRel) + bytes;
        self.0.peak.fetch_max(now, Ordering::Relaxed);
        Lease {
            bytes,
            from,
            budget: self.0.clone(),
        }
    }

    async fn acquire_common(&self, n: u32) -> OwnedSemaphorePermit {
        if let Ok(p) = self.0.common.clone().try_acquire_many_owned(n) {
            return p;
        }
        let _waiting = Waiting::new(&self.0.waiting);
        self.0
            .common
            .clone()
            .acquire_many_owned(n)
            .await
            .expect("the payload semaphore is never closed")
    }
}

impl Default for PayloadBudget {
    fn default() -> Self {
        PayloadBudget::new(Self::DEFAULT_BYTES)
    }
}

impl fmt::Debug for PayloadBudget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PayloadBudget")
            .field("total", &self.total())
            .field("in_use", &self.in_use())
            .finish()
    }
}

/// The part of the budget set aside for one connection.
pub(super) struct Allowance {
    size: usize,
    used: Arc<AtomicUsize>,
    _slot: Option<OwnedSemaphorePermit>,
}

impl Allowance {
    fn try_take(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used + bytes <= self.size).then_some(used + bytes)
            })
            .is_ok()
    }
}

/// Bytes taken from a [`PayloadBudget`], given back on drop.
pub(super) struct Lease {
    bytes: usize,
    from: Source,
    budget: Arc<Shared>,
}

/// Where a lease's bytes came from.
enum Source {
    Allowance(Arc<AtomicUsize>),
    /// Dropping the permit gives the bytes back.
    Common {
        _permit: OwnedSemaphorePermit,
    },
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Source::Allowance(used) = &self.from {
            used.fetch_sub(self.bytes, Ordering::AcqRel);
        }
        self.budget.in_use.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// Counts a waiter for as long as it waits, also when its future is dropped.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Waiting(count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What one connection has in flight, from reading a request until its reply is sent. The
/// reader stops reading while it is over either bound, so a client that sends faster than the
/// export answers (or never reads its replies) holds at most the bounds plus one request.
pub(super) struct ConnBudget {
    requests: AtomicUsize,
    bytes: AtomicUsize,
    max_requests: usize,
    max_bytes: usize,
    pub(super) freed: Notify,
}

impl ConnBudget {
    pub(super) fn new(max_requests: usize, max_bytes: usize) -> Self {
        ConnBudget {
            requests: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            max_requests: max_requests.max(1),
            max_bytes: max_bytes.max(MAX_PAYLOAD as usize),
            freed: Notify::new(),
        }
    }

    pub(super) fn has_room(&self) -> bool {
        self.requests.load(Ordering::Acquire) < self.max_requests
            && self.bytes.load(Ordering::Acquire) < self.max_bytes
    }

    pub(super) fn take(&self, bytes: usize) {
        self.requests.fetch_add(1, Ordering::AcqRel);
        self.bytes.fetch_add(bytes, Ordering::AcqRel);
    }

    pub(super) fn release(&self, requests: usize, bytes: usize) {
        self.requests.fetch_sub(requests, Ordering::AcqRel);
        self.bytes.fetch_sub(bytes, Ordering::AcqRel);
        self.freed.notify_one();
    }
}

/// When a connection last moved bytes while it waited on its client: sending replies (the
/// client must read them) or receiving a write payload (the client must send the rest).
pub(super) struct Activity {
    epoch: Instant,
    sending: Clock,
    receiving: Clock,
}

/// Milliseconds since the epoch, plus one, of the last progress; 0 while not waiting on the
/// client.
#[derive(Default)]
struct Clock(AtomicU64);

/// Which way a connection waits on its client.
#[derive(Debug, Clone, Copy)]
pub(super) enum Direction {
    /// Replies are being written.
    Sending,
    /// A write payload is being read.
    Receiving,
}

impl Activity {
    pub(super) fn new() -> Self {
        Activity {
            epoch: Instant::now(),
            sending: Clock::default(),
            receiving: Clock::default(),
        }
    }

    fn clock(&self, d: Direction) -> &Clock {
        match d {
            Direction::Sending => &self.sending,
            Direction::Receiving => &self.receiving,
        }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Starts waiting on the client (the stall clock starts now).
    pub(super) fn start(&self, d: Direction) {
        self.clock(d).0.store(self.now(), Ordering::Release);
    }

    /// Bytes moved: the stall clock starts again.
    pub(super) fn progress(&self, d: Direction) {
        let clock = &self.clock(d).0;
        if clock.load(Ordering::Acquire) != 0 {
            clock.store(self.now(), Ordering::Release);
        }
    }

    /// No longer waiting on the client.
    pub(super) fn stop(&self, d: Direction) {
        self.clock(d).0.store(0, Ordering::Release);
    }

    /// How long the client has moved nothing that the connection waits for (zero when the
    /// connection waits for nothing from it).
    pub(super) fn stalled_for(&self) -> Duration {
        let now = self.now();
        let since = |c: &Clock| match c.0.load(Ordering::Acquire) {
            0 => 0,
            t => now.saturating_sub(t),
        };
        Duration::from_millis(since(&self.sending).max(since(&self.receiving)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn budget_counts_what_is_held_and_the_peak() {
        let budget = PayloadBudget::new(64 << 20);
        let none = budget.allowance();
        let a = budget.acquire(&none, 1 << 20).await;
        let b = budget.acquire(&none, 2 << 20).await;
        assert_eq!(budget.in_use(), 3 << 20);

        drop(a);
        drop(b);

        assert_eq!(budget.in_use(), 0);
        assert_eq!(budget.peak(), 3 << 20);
    }

    #[tokio::test]
    async fn requests_that_fit_the_allowance_do_not_wait_when_the_common_part_is_spent() {
        let budget = PayloadBudget::new(PayloadBudget::MIN_BYTES);
        let hog = budget.allowance();
        let mut held = Vec::new();
        while budget.0.common.available_permits() >= MAX_PAYLOAD as usize {
            held.push(budget.acquire(&hog, MAX_PAYLOAD as usize).await);
        }
        let polite = budget.allowance();

        let small = tokio::time::timeout(
            Duration::from_secs(1),
            budget.acquire(&polite, PayloadBudget::ALLOWANCE),
        )
        .await;

        assert!(small.is_ok(), "a request within the allowance waited");
    }

    #[tokio::test]
    async fn a_waiter_makes_the_budget_short_until_it_is_served() {
        let budget = PayloadBudget::new(0);
        let none = Arc::new(Allowance {
            size: 0,
            used: Arc::new(AtomicUsize::new(0)),
            _slot: None,
        });
        let mut all = Vec::new();
        while budget.0.common.available_permits() >= MAX_PAYLOAD as usize {
            all.push(budget.acquire(&none, MAX_PAYLOAD as usize).await);
        }
        assert!(!budget.is_short());
        let (b, n) = (budget.clone(), none.clone());
        let waiter = tokio::spawn(async move { b.acquire(&n, MAX_PAYLOAD as usize).await });
        while !budget.is_short() {
            tokio::task::yield_now().await;
        }

        drop(all);

        drop(waiter.await.unwrap());
        assert!(!budget.is_short());
    }

    #[test]
    fn activity_measures_a_stall_only_while_waiting_on_the_client() {
        let a = Activity::new();
        assert_eq!(a.stalled_for(), Duration::ZERO);
        a.start(Direction::Sending);
        std::thread::sleep(Duration::from_millis(30));
        assert!(a.stalled_for() >= Duration::from_millis(20));

        a.progress(Direction::Sending);
        assert!(a.stalled_for() < Duration::from_millis(20));
        a.stop(Direction::Sending);
        std::thread::sleep(Duration::from_millis(30));

        assert_eq!(a.stalled_for(), Duration::ZERO);
    }
}
