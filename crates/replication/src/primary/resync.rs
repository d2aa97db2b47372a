//! The resync job: copies the dirty ranges to the secondary while the VM keeps writing, until
//! the two disks are equal again.
//!
//! ```text
//!   dirty bitmap --next range, in offset order--> range lock --read local--> forwarding queue
//!        ^                                           (held until queued)        |
//!        '--- bits cleared when the copy is acknowledged, unless marked again --'
//! ```
//!
//! Order: a copy reads its range under the node's range lock and enters the forwarding queue
//! before the lock is released, exactly as a VM write does, so the forwarder's rule for
//! overlapping changes keeps it behind every older write of the range and ahead of every newer
//! one. A bit is cleared only when its copy is acknowledged, and not at all if the range was
//! marked again while the copy was on its way (a newer write that failed). The job runs while
//! the node is running and the link is usable; when either goes, the bits left say where it
//! resumes.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use blockdev::{BlockDev, ZeroFlags};
use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::{Notify, oneshot};
use tracing::{info, warn};

use super::PrimaryEvent;
use super::dirty::CopyTicket;
use super::forward::{Ack, Change, Forwarder, Shared};
use super::range_lock::RangeLock;
use crate::Stage;

/// Largest copy: big enough to stream, small enough not to hold a range lock for long.
const CHUNK: u64 = 2 << 20;
/// Copies on their way at once.
const WINDOW: usize = 16;
/// VM payload queued for the link beyond which the resync holds its next copy back.
const VM_FIRST: u64 = 2 << 20;
/// The longest a copy is held back for the VM's writes (a VM that writes without pause must
/// not stop the resync for good).
const VM_FIRST_LONGEST: Duration = Duration::from_millis(50);
/// Pause before a pass that follows one that made no progress (a local read failing), and
/// the longest wait before looking at the bitmap again without a kick.
const RETRY: Duration = Duration::from_secs(1);

/// Progress of the current (or last) resync job.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResyncStatus {
    /// A job is copying now.
    pub active: bool,
    /// Bytes copied plus bytes still dirty (grows when the VM dirties more during the job).
    pub total_bytes: u64,
    /// Bytes whose copy the secondary acknowledged.
    pub done_bytes: u64,
    /// Payload written to the secondary (write-zeroes carry none).
    pub sent_bytes: u64,
}

/// The job's counters and its wake-up, shared with the node.
#[derive(Default)]
pub(super) struct ResyncState {
    kick: Notify,
    active: AtomicBool,
    done: AtomicU64,
    sent: AtomicU64,
    /// `total_bytes` as it was when the last job ended.
    final_total: AtomicU64,
}

impl ResyncState {
    /// Something changed (start, new link, new dirty bits): look again.
    pub(super) fn kick(&self) {
        self.kick.notify_one();
    }

    pub(super) fn status(&self, dirty_bytes: u64) -> ResyncStatus {
        let active = self.active.load(Ordering::SeqCst);
        let done = self.done.load(Ordering::Relaxed);
        ResyncStatus {
            active,
            total_bytes: if active {
                done + dirty_bytes
            } else {
                self.final_total.load(Ordering::Relaxed)
            },
            done_bytes: done,
            sent_bytes: self.sent.load(Ordering::Relaxed),
        }
    }
}

/// What the job works with: the node's parts, not the node (which owns the job's task).
pub(super) struct Job {
    pub local: Arc<dyn BlockDev>,
    pub shared: Arc<Shared>,
    pub forwarder: Arc<Forwarder>,
    pub order: Arc<RangeLock>,
    pub stage: Arc<Mutex<Stage>>,
    pub state: Arc<ResyncState>,
    /// Payload bytes per second at most.
    pub rate: Option<u64>,
    /// Bytes a checksum sync has yet to compare: the copies wait for it, so that a range the
    /// comparison marks is copied once, not once before and once after.
    pub comparing: Arc<AtomicU64>,
}

/// The read buffers of one pass, back when the secondary has their copy: a pass reads
/// through the same few buffers instead of a fresh allocation per copy, whose page faults and
/// zeroing cost the kernel about a fifth of a full sync's CPU. Dropped with the pass, so an idle
/// primary keeps none.
#[derive(Default)]
struct Buffers(Mutex<Vec<Vec<u8>>>);

/// A buffer on its way: it goes home when its last reference is dropped, if its pass still runs.
struct Lent {
    buf: Vec<u8>,
    home: Weak<Buffers>,
}

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        if let Some(home) = self.home.upgrade() {
            let mut free = home.0.lock();
            if free.len() <= WINDOW {
                free.push(std::mem::take(&mut self.buf));
            }
        }
    }
}

/// A copy on its way: its ticket, the answers of its changes, its length.
struct Copy {
    ticket: CopyTicket,
    acks: Vec<oneshot::Receiver<Ack>>,
    /// A change of it could not even be queued (the node is going away).
    lost: bool,
    len: u64,
    /// Payload bytes it put in the forwarding queue.
    payload: u64,
}

impl Job {
    /// Whether copies can go now.
    fn ready(&self) -> bool {
        *self.stage.lock() == Stage::Running
            && self.shared.usable_link().is_some()
            && self.comparing.load(Ordering::SeqCst) == 0
    }

    /// The job's task: runs until the node is dropped.
    pub(super) async fn run(self) {
        let mut stalled = false;
        loop {
            let kicked = self.state.kick.notified();
            tokio::pin!(kicked);
            kicked.as_mut().enable();
            if self.ready() && self.shared.dirty.dirty_clusters() > 0 {
                if stalled {
                    let _ = tokio::time::timeout(RETRY, kicked.as_mut()).await;
                }
                stalled = !self.job().await;
                continue;
            }
            // A failure whose ranges were all copied since (or that named none: a refused
            // flush with nothing written since the last checkpoint) is repaired.
            if self.ready()
                && self.shared.dirty.dirty_clusters() == 0
                && !self.shared.unrepairable.load(Ordering::SeqCst)
                && let Some(e) = self.shared.error.lock().take()
            {
                info!("forwarding error repaired, nothing left to copy: {e}");
            }
            // Forwarding failures mark bits without a kick: look again now and then.
            let _ = tokio::time::timeout(RETRY, kicked).await;
        }
    }

    /// One job: passes over the bitmap until it is clean or copies cannot go on. Returns
    /// whether it made progress.
    async fn job(&self) -> bool {
        let s = &self.state;
        s.done.store(0, Ordering::Relaxed);
        s.sent.store(0, Ordering::Relaxed);
        s.active.store(true, Ordering::SeqCst);
        let dirty = self.shared.dirty.dirty_bytes();
        info!(bytes = dirty, "resync started");
        let _ = self
            .shared
            .events
            .send(PrimaryEvent::ResyncStarted { bytes: dirty });
        let mut progress = false;
        // Bits set behind the cursor during a pass are taken by the next one.
        while self.ready() && self.shared.dirty.dirty_clusters() > 0 {
            let done_before = s.done.load(Ordering::Relaxed);
            if let Err(e) = self.pass().await {
                warn!("resync stopped: {e}");
                let _ = self
                    .shared
                    .events
                    .send(PrimaryEvent::ResyncFailed { error: e });
                break;
            }
            if s.done.load(Ordering::Relaxed) == done_before {
                break;
            }
            progress = true;
        }
        let left = self.shared.dirty.dirty_bytes();
        let done = s.done.load(Ordering::Relaxed);
        s.final_total.store(done + left, Ordering::Relaxed);
        s.active.store(false, Ordering::SeqCst);
        let sent = s.sent.load(Ordering::Relaxed);
        if left == 0 {
            // Every range a failed forward marked is on the secondary now: the error that
            // made checkpoints wait is repaired.
            if !self.shared.unrepairable.load(Ordering::SeqCst)
                && let Some(e) = self.shared.error.lock().take()
            {
                info!("forwarding error repaired by the resync: {e}");
            }
            info!(
                copied = done,
                sent, "resync done: the secondary has every write"
            );
            let _ = self
                .shared
                .events
                .send(PrimaryEvent::ResyncDone { bytes: done, sent });
        } else {
            info!(
                copied = done,
                left, "resync paused (link or stage), resumes later"
            );
        }
        progress
    }

    /// Copies every range dirty now, in offset order, with up to [`WINDOW`] copies on their
    /// way. A local read that fails ends the pass (its bits stay).
    async fn pass(&self) -> Result<(), String> {
        let mut flight: VecDeque<Copy> = VecDeque::new();
        let mut cursor = 0;
        let mut result = Ok(());
        let (started, sent_before) = (Instant::now(), self.state.sent.load(Ordering::Relaxed));
        let buffers = Arc::new(Buffers::default());
        while self.ready() {
            if let Some(rate) = self.rate {
                // Ahead of the rate: wait until the bytes sent so far are due.
                let sent = self.state.sent.load(Ordering::Relaxed) - sent_before;
                let due = Duration::from_secs_f64(sent as f64 / rate.max(1) as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
            // The VM's writes go first: while they queue up for the link, no new copy joins
            // them (the copies on their way are at most WINDOW pieces).
            let ours: u64 = flight.iter().map(|c| c.payload).sum();
            let mut waited = Duration::ZERO;
            while self.shared.stats.queued_bytes.load(Ordering::Relaxed) > ours + VM_FIRST
                && waited < VM_FIRST_LONGEST
            {
                tokio::time::sleep(Duration::from_millis(1)).await;
                waited += Duration::from_millis(1);
            }
            let Some((offset, len)) = self.shared.dirty.next_dirty(cursor, CHUNK) else {
                break;
            };
            cursor = offset + len;
            match self.copy(offset, len, &buffers).await {
                Ok(copy) => flight.push_back(copy),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
            while flight.len() >= WINDOW {
                self.settle(flight.pop_front().expect("window is not empty"))
                    .await;
            }
        }
        for copy in flight {
            self.settle(copy).await;
        }
        result
    }

    /// Queues one copy: holes as write-zeroes, data as writes, under the range lock.
    async fn copy(&self, offset: u64, len: u64, buffers: &Arc<Buffers>) -> Result<Copy, String> {
        let _guard = self.order.lock(offset, len).await;
        let extents = self
            .local
            .block_status(offset, len)
            .await
            .map_err(|e| format!("block status of the local disk: {e}"))?;
        let mut changes = Vec::new();
        let mut at = offset;
        // The extents as (length, zero), then whatever they fell short of as data, to be safe.
        let pieces = extents
            .iter()
            .map(|e| (e.len, e.zero))
            .chain(std::iter::once((u64::MAX, false)));
        for (n, zero) in pieces {
            if at == offset + len {
                break;
            }
            let n = n.min(offset + len - at);
            if n == 0 {
                continue;
            }
            changes.push(if zero {
                let flags = ZeroFlags {
                    may_unmap: true,
                    ..Default::default()
                };
                Change::Zeroes {
                    offset: at,
                    len: n,
                    flags,
                }
            } else {
                let buf = buffers.0.lock().pop().unwrap_or_default();
                let buf = self
                    .local
                    .read_reusing(at, n as usize, buf)
                    .await
                    .map_err(|e| format!("reading the local disk: {e}"))?;
                let data = Bytes::from_owner(Lent {
                    buf,
                    home: Arc::downgrade(buffers),
                });
                Change::Write {
                    offset: at,
                    data,
                    fua: false,
                }
            });
            at += n;
        }
        let ticket = self.shared.dirty.begin_copy(offset, len);
        let mut acks = Vec::with_capacity(changes.len());
        let mut lost = false;
        let mut payload = 0;
        for change in changes {
            if let Change::Write { data, .. } = &change {
                payload += data.len() as u64;
                self.state
                    .sent
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            match self.forwarder.push(change, true).await {
                Some(ack) => acks.push(ack),
                None => lost = true,
            }
        }
        Ok(Copy {
            ticket,
            acks,
            lost,
            len,
            payload,
        })
    }

    /// Waits for a copy's answers; clears its bits if every change of it was acknowledged.
    async fn settle(&self, copy: Copy) {
        let mut ok = !copy.lost;
        for ack in copy.acks {
            ok &= matches!(ack.await, Ok(Ok(())));
        }
        if self.shared.dirty.finish_copy(copy.ticket, ok) {
            self.state.done.fetch_add(copy.len, Ordering::Relaxed);
        }
    }
}
