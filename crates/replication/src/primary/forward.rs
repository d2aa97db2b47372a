//! The forwarding queue: carries the primary's changes to the secondary in order, pipelined,
//! within a bound in bytes and requests, and turns every failure into the node's sticky error
//! plus dirty ranges instead of an error for the VM.
//!
//! ```text
//!  VM write -> local disk -> push(op) --bounded queue--> forwarder task --link--> secondary
//!                                   (backpressure)        | overlaps wait for the earlier op
//!                                                         | barrier: wait all, flush, answer
//! ```
//!
//! Order: ops enter the queue in local completion order (the node's range lock ensures that for
//! overlapping writes); the forwarder never sends an op while an overlapping earlier op is still
//! in flight, so overlapping writes reach the secondary in that same order, while disjoint ones
//! are pipelined.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use blockdev::{BatchWrite, BlockDev, BlockError, ErrorKind, WriteFlags, ZeroFlags};
use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::task::AtomicWaker;
use futures::{FutureExt, StreamExt};
use parking_lot::Mutex;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, oneshot};
use tracing::{debug, warn};

use super::dirty::DirtyBitmap;
use super::{PrimaryEvent, QueueLimits};

/// One change to carry to the secondary.
#[derive(Debug, Clone)]
pub enum Change {
    Write {
        offset: u64,
        data: Bytes,
        fua: bool,
    },
    Zeroes {
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    },
    Flush,
}

impl Change {
    /// The byte range the change touches (none for a flush).
    pub fn range(&self) -> Option<(u64, u64)> {
        match self {
            Change::Write { offset, data, .. } => Some((*offset, data.len() as u64)),
            Change::Zeroes { offset, len, .. } => Some((*offset, *len)),
            Change::Flush => None,
        }
    }

    fn payload_bytes(&self) -> usize {
        match self {
            Change::Write { data, .. } => data.len(),
            _ => 0,
        }
    }
}

/// What a forwarded change or a barrier reports back.
pub type Ack = Result<(), String>;

enum Item {
    Change {
        change: Change,
        ack: Option<oneshot::Sender<Ack>>,
        _budget: Budget,
    },
    /// Answers once everything before it is acknowledged (and flushed when asked).
    Barrier {
        flush: bool,
        ack: oneshot::Sender<Ack>,
    },
}

struct Budget {
    _requests: OwnedSemaphorePermit,
    _bytes: Option<OwnedSemaphorePermit>,
}

/// Counters exposed in status and metrics.
#[derive(Debug, Default)]
pub struct ForwardStats {
    /// Writes the secondary acknowledged.
    pub forwarded_writes: AtomicU64,
    /// Payload bytes the secondary acknowledged.
    pub forwarded_bytes: AtomicU64,
    /// Forwards that failed.
    pub forward_errors: AtomicU64,
    /// Changes queued or in flight.
    pub queued_requests: AtomicU64,
    /// Payload bytes queued or in flight.
    pub queued_bytes: AtomicU64,
}

/// State shared by the node and the forwarder task.
pub struct Shared {
    pub link: Mutex<Option<Arc<dyn BlockDev>>>,
    /// The link failed or hung: stop waiting for it and record writes as dirty instead.
    pub link_down: AtomicBool,
    pub error: Mutex<Option<String>>,
    /// A failure no dirty range describes (a flush the secondary refused: its kernel may
    /// have dropped written pages) happened since start: a resync cannot repair the error.
    pub unrepairable: AtomicBool,
    /// The persistent write log: it names every write since the last checkpoint's flush, so
    /// a refused flush is described by its ranges and a resync repairs it.
    pub log: std::sync::OnceLock<Arc<crate::state::ExtentLog>>,
    pub dirty: DirtyBitmap,
    pub stats: ForwardStats,
    pub events: broadcast::Sender<PrimaryEvent>,
    pub timeout: Option<Duration>,
}

impl Shared {
    /// Records a failure: sticky error, counted, an event, and the range marked dirty.
    pub fn fail(&self, range: Option<(u64, u64)>, err: &str, link_lost: bool) {
        self.stats.forward_errors.fetch_add(1, Ordering::Relaxed);
        match (range, self.log.get()) {
            (Some((o, l)), _) => self.dirty.mark(o, l),
            (None, Some(log)) => log
                .ranges()
                .into_iter()
                .for_each(|(o, l)| self.dirty.mark(o, l)),
            (None, None) => self.unrepairable.store(true, Ordering::SeqCst),
        }
        let first = {
            let mut e = self.error.lock();
            let first = e.is_none();
            e.get_or_insert_with(|| err.to_string());
            first
        };
        if first {
            warn!("forwarding to the secondary failed: {err}");
        }
        if link_lost && !self.link_down.swap(true, Ordering::SeqCst) {
            warn!("secondary link lost: {err}; serving at local speed, recording dirty ranges");
            let _ = self.events.send(PrimaryEvent::LinkLost {
                reason: err.to_string(),
            });
        }
        let _ = self.events.send(PrimaryEvent::ForwardFailed {
            offset: range.map_or(0, |r| r.0),
            len: range.map_or(0, |r| r.1),
            error: err.to_string(),
        });
    }

    /// A change that found no usable link: its range is dirty; the answer is the sticky error.
    fn not_sent(&self, range: Option<(u64, u64)>) -> String {
        if let Some((o, l)) = range {
            self.dirty.mark(o, l);
        }
        self.error
            .lock()
            .clone()
            .unwrap_or_else(|| "the secondary is not connected".into())
    }

    /// Counts a forwarded change, or turns its failure into the sticky error and dirty range.
    fn settle(
        &self,
        range: Option<(u64, u64)>,
        written: Option<usize>,
        result: Result<(), BlockError>,
    ) -> Ack {
        match result {
            Ok(()) => {
                if let Some(written) = written {
                    self.stats.forwarded_writes.fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .forwarded_bytes
                        .fetch_add(written as u64, Ordering::Relaxed);
                }
                Ok(())
            }
            Err(e) => {
                let lost = matches!(e.kind, ErrorKind::Shutdown | ErrorKind::TimedOut);
                debug!("forward failed: {e}");
                self.fail(range, &e.to_string(), lost);
                Err(e.to_string())
            }
        }
    }

    /// A change left the queue (answered or failed): counted out, its answer given to whoever
    /// asked, its share of the queue's budget released.
    fn answered(&self, payload: usize, ack: Option<oneshot::Sender<Ack>>, budget: Budget, r: Ack) {
        self.stats.queued_requests.fetch_sub(1, Ordering::Relaxed);
        self.stats
            .queued_bytes
            .fetch_sub(payload as u64, Ordering::Relaxed);
        if let Some(ack) = ack {
            let _ = ack.send(r);
        }
        drop(budget);
    }

    /// The link, unless it is down or not set.
    pub fn usable_link(&self) -> Option<Arc<dyn BlockDev>> {
        if self.link_down.load(Ordering::SeqCst) {
            return None;
        }
        self.link.lock().clone()
    }
}

/// The bounded queue and its consumer.
pub struct Forwarder {
    items: Mutex<VecDeque<Item>>,
    /// The forwarder task, its only consumer, waiting for items (cheaper per push than a
    /// `Notify`, which takes a lock to register and to wake).
    wake: AtomicWaker,
    requests: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    byte_limit: usize,
    max_in_flight: usize,
    /// Gather changes before sending (async mode, where the VM does not wait for them).
    gather: bool,
    shared: Arc<Shared>,
}

impl Forwarder {
    pub fn new(limits: QueueLimits, gather: bool, shared: Arc<Shared>) -> Arc<Self> {
        Arc::new(Forwarder {
            items: Mutex::new(VecDeque::new()),
            wake: AtomicWaker::new(),
            requests: Arc::new(Semaphore::new(limits.max_requests.max(1))),
            bytes: Arc::new(Semaphore::new(limits.max_bytes.max(1))),
            byte_limit: limits.max_bytes.max(1),
            max_in_flight: limits.max_in_flight.max(1),
            gather,
            shared,
        })
    }

    /// Queues a change, waiting while the queue is full (backpressure). The receiver, if
    /// asked for, reports the secondary's answer.
    pub async fn push(&self, change: Change, want_ack: bool) -> Option<oneshot::Receiver<Ack>> {
        let requests = self.requests.clone().acquire_owned().await.ok()?;
        let n = change.payload_bytes().min(self.byte_limit);
        let bytes = if n > 0 {
            Some(self.bytes.clone().acquire_many_owned(n as u32).await.ok()?)
        } else {
            None
        };
        let (tx, rx) = if want_ack {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        self.shared
            .stats
            .queued_requests
            .fetch_add(1, Ordering::Relaxed);
        self.shared
            .stats
            .queued_bytes
            .fetch_add(change.payload_bytes() as u64, Ordering::Relaxed);
        let item = Item::Change {
            change,
            ack: tx,
            _budget: Budget {
                _requests: requests,
                _bytes: bytes,
            },
        };
        self.items.lock().push_back(item);
        self.wake.wake();
        rx
    }

    /// Queues a barrier; the receiver answers once everything queued before is acknowledged.
    pub fn barrier(&self, flush: bool) -> oneshot::Receiver<Ack> {
        let (tx, rx) = oneshot::channel();
        self.items
            .lock()
            .push_back(Item::Barrier { flush, ack: tx });
        self.wake.wake();
        rx
    }

    async fn next(&self) -> Item {
        std::future::poll_fn(|cx| {
            // Registered before looking, so that a push after the look wakes this task.
            self.wake.register(cx.waker());
            match self.items.lock().pop_front() {
                Some(item) => std::task::Poll::Ready(item),
                None => std::task::Poll::Pending,
            }
        })
        .await
    }

    /// The forwarder task: runs until the node is dropped.
    ///
    /// The changes in flight are futures polled by this one task, not a task each: a reply
    /// then costs no task switch, and a burst of replies wakes the forwarder once. The writes
    /// that may go together leave as one batch ([`BlockDev::write_batch`]): on the NBD link
    /// one run of frames and one wake-up for all their replies.
    pub async fn run(self: Arc<Self>) {
        let mut flight = InFlight::new(self.max_in_flight);
        let mut waiting: Option<Item> = None;
        loop {
            if waiting.is_none() {
                waiting = self.items.lock().pop_front();
            }
            let burst_id = flight.new_id();
            let mut burst = Vec::new();
            // A batch answers when its slowest write has: writes the link must split or follow
            // with a flush (FUA) go on their own, not holding up a burst of small ones.
            let burst_limit = self
                .shared
                .link
                .lock()
                .as_ref()
                .map_or(0, |l| l.info().max_request as usize);
            // Send all that may go now; stop at the first item that must wait.
            while let Some(item) = waiting.take() {
                let may_go = match &item {
                    Item::Change { change, .. } => flight.may_send(change.range()),
                    // Everything before a barrier must be acknowledged first.
                    Item::Barrier { .. } => flight.is_empty(),
                };
                if !may_go {
                    waiting = Some(item);
                    break;
                }
                match item {
                    Item::Change {
                        change: Change::Write { offset, data, fua },
                        ack,
                        _budget: budget,
                    } if !fua && !data.is_empty() && data.len() <= burst_limit => {
                        flight.admit(burst_id, Some((offset, data.len() as u64)));
                        burst.push(Queued {
                            write: BatchWrite {
                                offset,
                                data,
                                flags: WriteFlags { fua },
                            },
                            ack,
                            budget,
                        });
                    }
                    Item::Change {
                        change,
                        ack,
                        _budget: budget,
                    } => {
                        let shared = self.shared.clone();
                        let id = flight.new_id();
                        flight.admit(id, change.range());
                        flight.launch(id, 1, async move {
                            let r = send(&shared, &change).await;
                            shared.answered(change.payload_bytes(), ack, budget, r);
                        });
                    }
                    Item::Barrier { flush, ack } => {
                        let r = if flush {
                            send(&self.shared, &Change::Flush).await
                        } else {
                            Ok(())
                        };
                        let r = r.and_then(|()| match self.shared.error.lock().clone() {
                            Some(e) => Err(e),
                            None => Ok(()),
                        });
                        let _ = ack.send(r);
                    }
                }
                waiting = self.items.lock().pop_front();
            }
            if !burst.is_empty() {
                let shared = self.shared.clone();
                let n = burst.len();
                flight.launch(burst_id, n, async move {
                    let writes: Vec<BatchWrite> = burst.iter().map(|q| q.write.clone()).collect();
                    let acks = send_burst(&shared, writes).await;
                    for (r, q) in acks.into_iter().zip(burst) {
                        shared.answered(q.write.data.len(), q.ack, q.budget, r);
                    }
                });
            }
            tokio::select! {
                biased;
                Some(done) = flight.running.next(), if !flight.running.is_empty() => {
                    flight.retire(done);
                    // Take every other reply that is already in.
                    while let Some(Some(done)) = flight.running.next().now_or_never() {
                        flight.retire(done);
                    }
                }
                item = self.next(), if waiting.is_none() => {
                    waiting = Some(item);
                    if self.gather {
                        // Let the writes being served right now join this one: more frames per
                        // send, fewer wake-ups of the secondary. Nobody waits on a forward here.
                        tokio::task::yield_now().await;
                    }
                }
            }
        }
    }
}

/// A write waiting in a burst for [`BlockDev::write_batch`].
struct Queued {
    write: BatchWrite,
    ack: Option<oneshot::Sender<Ack>>,
    budget: Budget,
}

/// The future carrying changes over the link; resolves to (id, number of changes it carried).
type Carrying = Pin<Box<dyn Future<Output = (u64, usize)> + Send>>;

/// The changes on the link: their futures (one per change, or one per burst of writes) and
/// the ranges they touch.
struct InFlight {
    running: FuturesUnordered<Carrying>,
    /// (id, start, end) of every write or zeroing admitted; a flush has no range.
    ranges: Vec<(u64, u64, u64)>,
    /// Changes admitted and not yet answered (a burst counts each of its writes).
    changes: usize,
    /// Most changes in flight at once.
    max: usize,
    next_id: u64,
}

impl InFlight {
    fn new(max: usize) -> Self {
        InFlight {
            running: FuturesUnordered::new(),
            ranges: Vec::new(),
            changes: 0,
            max: max.max(1),
            next_id: 0,
        }
    }

    fn is_empty(&self) -> bool {
        self.changes == 0
    }

    /// Whether a change may go now: there is room on the link, no overlapping change is in
    /// flight (it would race the earlier one), and for a flush nothing at all is (a flush covers
    /// what was acknowledged before it).
    fn may_send(&self, range: Option<(u64, u64)>) -> bool {
        match range {
            Some((o, l)) => {
                self.changes < self.max && !self.ranges.iter().any(|(_, s, e)| *s < o + l && o < *e)
            }
            None => self.is_empty(),
        }
    }

    fn new_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Counts a change as in flight under `id`, before its future is launched.
    fn admit(&mut self, id: u64, range: Option<(u64, u64)>) {
        self.changes += 1;
        if let Some((o, l)) = range {
            self.ranges.push((id, o, o + l));
        }
    }

    /// Starts the future that carries the `n` changes admitted under `id`.
    fn launch(&mut self, id: u64, n: usize, f: impl Future<Output = ()> + Send + 'static) {
        self.running.push(Box::pin(f.map(move |()| (id, n))));
    }

    fn retire(&mut self, (id, n): (u64, usize)) {
        self.changes -= n;
        self.ranges.retain(|(r, _, _)| *r != id);
    }
}

/// Sends one change over the link, with the link timeout; failures become sticky.
async fn send(shared: &Shared, change: &Change) -> Ack {
    let range = change.range();
    let Some(link) = shared.usable_link() else {
        return Err(shared.not_sent(range));
    };
    let op = async {
        match change.clone() {
            Change::Write { offset, data, fua } => {
                link.write(offset, data, WriteFlags { fua }).await
            }
            Change::Zeroes { offset, len, flags } => link.write_zeroes(offset, len, flags).await,
            Change::Flush => link.flush().await,
        }
    };
    let result = match shared.timeout {
        Some(t) => tokio::time::timeout(t, op)
            .await
            .unwrap_or_else(|_| Err(no_answer(t, range))),
        None => op.await,
    };
    let written = match change {
        Change::Write { data, .. } => Some(data.len()),
        _ => None,
    };
    shared.settle(range, written, result)
}

/// Sends a burst of writes over the link in one batch, with one link timeout for all.
async fn send_burst(shared: &Shared, writes: Vec<BatchWrite>) -> Vec<Ack> {
    let ranges: Vec<(u64, u64)> = writes
        .iter()
        .map(|w| (w.offset, w.data.len() as u64))
        .collect();
    let Some(link) = shared.usable_link() else {
        return ranges
            .iter()
            .map(|r| Err(shared.not_sent(Some(*r))))
            .collect();
    };
    let op = link.write_batch(writes);
    // On the timer, every write of the burst counts as failed (and dirty), including any the
    // secondary did acknowledge: the batch gives no partial answer, and dirty is the safe side.
    let mut results = match shared.timeout {
        Some(t) => tokio::time::timeout(t, op).await.unwrap_or_else(|_| {
            ranges
                .iter()
                .map(|(o, _)| Err(no_answer(t, Some((*o, 0)))))
                .collect()
        }),
        None => op.await,
    };
    if results.len() != ranges.len() {
        // A device that broke write_batch's contract: no write may go unaccounted for.
        let short = BlockError::new(ErrorKind::Io(None), blockdev::Op::Write, 0).context(format!(
            "the link answered {} of {} batched writes",
            results.len(),
            ranges.len()
        ));
        results = ranges.iter().map(|_| Err(short.clone())).collect();
    }
    ranges
        .iter()
        .zip(results)
        .map(|(&(o, l), r)| shared.settle(Some((o, l)), Some(l as usize), r))
        .collect()
}

fn no_answer(t: Duration, range: Option<(u64, u64)>) -> BlockError {
    BlockError::new(
        ErrorKind::TimedOut,
        blockdev::Op::Write,
        range.map_or(0, |r| r.0),
    )
    .context(format!("the secondary did not answer within {t:?}"))
}
