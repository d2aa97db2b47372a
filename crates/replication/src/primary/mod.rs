//! The primary replication node: serves the VM from the local disk and carries every change to
//! the secondary.
//!
//! ```text
//!   VM (BlockDev) --> PrimaryNode --read/write--> local disk
//!                         |
//!                         '--changes--> Forwarder --link (NBD client)--> secondary replica
//! ```
//!
//! Differences from QEMU's primary (quorum + replication + NBD), on purpose:
//! - a local write error always reaches the VM (QEMU's quorum with vote-threshold=1 hides it);
//! - `async` mode (the default) acknowledges the VM once the local write is done; `sync` mode
//!   waits for the secondary as QEMU does;
//! - write-zeroes travel as such (QEMU sends zeroes as data); a discard becomes write-zeroes
//!   with unmap on both sides, so the two disks cannot differ where QEMU's quorum drops it;
//! - a forwarding failure is sticky, counted, raised as an event and fails the next checkpoint
//!   (drain) unless forced — QEMU only records it where COLO never looks;
//! - every write the secondary may have missed is recorded in a dirty bitmap, and a resync job
//!   copies those ranges as soon as the node runs with a usable link (module `resync`);
//! - `checkpoint` is a drain barrier (QEMU relies on stopping the VM to drain), and it is
//!   refused unless the two disks are known equal: running, link up, nothing dirty (QEMU's
//!   primary answers a checkpoint in any stage with success).

mod checksum;
mod dirty;
mod forward;
mod range_lock;
mod resync;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use blockdev::{BlockDev, BlockError, DevInfo, ExtentList, WriteFlags, ZeroFlags};
use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::broadcast;

pub use checksum::{ChecksumReport, Digest, RemoteDigests, digest_blocks};
pub use dirty::{CopyTicket, DirtyBitmap};
pub use forward::ForwardStats;
use forward::{Change, Forwarder, Shared};
use range_lock::RangeLock;
pub use resync::ResyncStatus;
use resync::{Job, ResyncState};

use crate::{Mode, ReplicationError, ReplicationEvent, Stage};

/// When a VM write completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ForwardMode {
    /// When the local write and the forward have both finished (QEMU's behaviour).
    Sync,
    /// When the local write is done; the forward follows through the bounded queue.
    #[default]
    Async,
}

impl ForwardMode {
    /// Every mode, by its name on command lines and in status.
    pub const ALL: [(&'static str, ForwardMode); 2] =
        [("async", ForwardMode::Async), ("sync", ForwardMode::Sync)];

    /// The mode's name.
    pub fn name(self) -> &'static str {
        match self {
            ForwardMode::Async => "async",
            ForwardMode::Sync => "sync",
        }
    }

    /// The mode called `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.iter().find(|(n, _)| *n == name).map(|(_, m)| *m)
    }
}

/// Bounds of the forwarding queue.
#[derive(Debug, Clone, Copy)]
pub struct QueueLimits {
    /// Payload bytes queued or in flight.
    pub max_bytes: usize,
    /// Changes queued or in flight.
    pub max_requests: usize,
    /// Changes in flight on the link at once.
    pub max_in_flight: usize,
}

impl Default for QueueLimits {
    fn default() -> Self {
        QueueLimits {
            max_bytes: 64 << 20,
            max_requests: 16384,
            max_in_flight: 64,
        }
    }
}

/// Primary configuration.
#[derive(Debug, Clone)]
pub struct PrimaryConfig {
    /// When a VM write completes.
    pub mode: ForwardMode,
    /// Bounds of the forwarding queue.
    pub queue: QueueLimits,
    /// Granularity of the dirty bitmap (a power of two).
    pub dirty_granularity: u64,
    /// A forward that takes longer declares the secondary lost.
    pub link_timeout: Option<Duration>,
    /// Most payload bytes per second the resync sends (none: as fast as the link takes them;
    /// the VM's writes share the forwarding queue with it either way).
    pub resync_rate: Option<u64>,
}

impl Default for PrimaryConfig {
    fn default() -> Self {
        PrimaryConfig {
            mode: ForwardMode::Async,
            queue: QueueLimits::default(),
            dirty_granularity: 64 << 10,
            link_timeout: Some(Duration::from_secs(10)),
            resync_rate: None,
        }
    }
}

/// The primary's control errors: [`ReplicationError`], whose variants cover both roles.
pub type PrimaryError = ReplicationError;

/// The primary's events: [`ReplicationEvent`], whose variants cover both roles.
pub type PrimaryEvent = ReplicationEvent;

/// A snapshot for status displays and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrimaryStatus {
    /// Where the node is in the stage machine.
    pub stage: Stage,
    /// When a VM write completes.
    pub mode: ForwardMode,
    /// The sticky forwarding error.
    pub error: Option<String>,
    /// The link is set and not given up on.
    pub link_up: bool,
    /// Changes queued or in flight.
    pub queued_requests: u64,
    /// Payload bytes queued or in flight.
    pub queued_bytes: u64,
    /// Writes the secondary acknowledged.
    pub forwarded_writes: u64,
    /// Payload bytes the secondary acknowledged.
    pub forwarded_bytes: u64,
    /// Forwards that failed.
    pub forward_errors: u64,
    /// Clusters the secondary may lack.
    pub dirty_clusters: u64,
    /// Bytes the secondary may lack.
    pub dirty_bytes: u64,
    /// The current (or last) resync job.
    pub resync: ResyncStatus,
}

/// The primary node. Cloning shares it.
#[derive(Clone)]
pub struct PrimaryNode {
    inner: Arc<Inner>,
}

struct Inner {
    local: Arc<dyn BlockDev>,
    mode: ForwardMode,
    stage: Arc<Mutex<Stage>>,
    shared: Arc<Shared>,
    forwarder: Arc<Forwarder>,
    order: Arc<RangeLock>,
    resync: Arc<ResyncState>,
    /// Bytes a checksum sync has yet to compare (checkpoints wait for it).
    comparing: Arc<AtomicU64>,
    /// The secondary took over: VM writes are refused (two VMs must never both write).
    fenced: AtomicBool,
    /// What to do before a write is served without the secondary, when the daemon keeps
    /// state (the write log itself is in `shared`, where a refused flush reads it too).
    alone: std::sync::OnceLock<Box<dyn Fn() -> Result<(), String> + Send + Sync>>,
    task: tokio::task::JoinHandle<()>,
    resync_task: tokio::task::JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.task.abort();
        self.resync_task.abort();
    }
}

impl PrimaryNode {
    /// A primary over `local`, not started, with no link yet. Must run inside a tokio runtime.
    pub fn new(local: Arc<dyn BlockDev>, config: PrimaryConfig) -> Self {
        let (events, _) = broadcast::channel(256);
        let shared = Arc::new(Shared {
            link: Mutex::new(None),
            link_down: false.into(),
            error: Mutex::new(None),
            unrepairable: false.into(),
            log: std::sync::OnceLock::new(),
            dirty: DirtyBitmap::new(local.len(), config.dirty_granularity),
            stats: ForwardStats::default(),
            events,
            timeout: config.link_timeout,
        });
        let forwarder = Forwarder::new(
            config.queue,
            config.mode == ForwardMode::Async,
            shared.clone(),
        );
        let task = tokio::spawn(forwarder.clone().run());
        let stage = Arc::new(Mutex::new(Stage::None));
        let order = Arc::new(RangeLock::default());
        let resync = Arc::new(ResyncState::default());
        let comparing = Arc::new(AtomicU64::new(0));
        let job = Job {
            comparing: comparing.clone(),
            local: local.clone(),
            shared: shared.clone(),
            forwarder: forwarder.clone(),
            order: order.clone(),
            stage: stage.clone(),
            state: resync.clone(),
            rate: config.resync_rate,
        };
        let resync_task = tokio::spawn(job.run());
        PrimaryNode {
            inner: Arc::new(Inner {
                local,
                mode: config.mode,
                stage,
                shared,
                forwarder,
                order,
                resync,
                comparing,
                fenced: AtomicBool::new(false),
                alone: std::sync::OnceLock::new(),
                task,
                resync_task,
            }),
        }
    }

    /// Sets (or replaces, after a reconnect) the link to the secondary. The dirty bitmap is
    /// kept, and the resync copies it over the new link once the node runs.
    pub fn set_link(&self, link: Arc<dyn BlockDev>) -> Result<(), PrimaryError> {
        let (local, remote) = (self.inner.local.len(), link.len());
        if local != remote {
            return Err(PrimaryError::DiskLengthMismatch { local, remote });
        }
        *self.inner.shared.link.lock() = Some(link);
        self.inner.shared.link_down.store(false, Ordering::SeqCst);
        self.inner.resync.kick();
        Ok(())
    }

    /// Records every VM write in `log` before it reaches the local disk (so a restarted
    /// primary knows what its secondary may lack), and calls `alone` before a write is served
    /// without a usable link (the daemon moves its generation then). Set once, before start.
    pub fn set_write_log(
        &self,
        log: Arc<crate::state::ExtentLog>,
        alone: impl Fn() -> Result<(), String> + Send + Sync + 'static,
    ) {
        let _ = self.inner.shared.log.set(log);
        let _ = self.inner.alone.set(Box::new(alone));
    }

    /// The persistent write log, if one is set.
    pub fn write_log(&self) -> Option<&Arc<crate::state::ExtentLog>> {
        self.inner.shared.log.get()
    }

    /// Drops the link (the secondary is being replaced): writes are recorded as dirty until
    /// the next [`set_link`](Self::set_link).
    pub fn clear_link(&self) {
        *self.inner.shared.link.lock() = None;
    }

    /// Whether a link is set and not given up on.
    pub fn link_up(&self) -> bool {
        self.inner.shared.usable_link().is_some()
    }

    /// Records that nothing is known of the secondary's content (a new secondary, or a
    /// primary that restarted and forgot what it had not yet sent): the resync then copies the
    /// whole disk, holes as write-zeroes.
    pub fn mark_all_dirty(&self) {
        self.inner.shared.dirty.mark_all();
        self.inner.resync.kick();
    }

    /// Says that the dirty bitmap now covers every write the secondary may lack, including
    /// writes it acknowledged before a flush it refused (the write log's ranges since the
    /// last checkpoint were marked, or a whole-disk comparison or copy was planned): the
    /// resync then repairs a flush failure too, as it repairs a failed write.
    pub fn covers_unflushed(&self) {
        self.inner
            .shared
            .unrepairable
            .store(false, Ordering::SeqCst);
        self.inner.resync.kick();
    }

    /// Progress of the current (or last) resync.
    pub fn resync_status(&self) -> ResyncStatus {
        self.inner
            .resync
            .status(self.inner.shared.dirty.dirty_bytes())
    }

    /// Whether the secondary is known to hold every write: running, link up, nothing dirty.
    /// The sticky error is not part of this (a checkpoint may override it with `force`).
    pub fn protected(&self) -> Result<(), PrimaryError> {
        let stage = self.stage();
        if stage != Stage::Running {
            return Err(PrimaryError::NotStarted(stage));
        }
        if self.inner.shared.usable_link().is_none() {
            return Err(PrimaryError::LinkDown);
        }
        match self.inner.comparing.load(Ordering::SeqCst) {
            0 => {}
            bytes => return Err(PrimaryError::Comparing { bytes }),
        }
        match self.inner.shared.dirty.dirty_bytes() {
            0 => Ok(()),
            bytes => Err(PrimaryError::Unsynced { bytes }),
        }
    }

    /// Subscribes to events.
    pub fn events(&self) -> broadcast::Receiver<PrimaryEvent> {
        self.inner.shared.events.subscribe()
    }

    /// The ranges the secondary may lack.
    pub fn dirty(&self) -> &DirtyBitmap {
        &self.inner.shared.dirty
    }

    /// Where the node is in the stage machine.
    pub fn stage(&self) -> Stage {
        *self.inner.stage.lock()
    }

    /// `replication_start(mode)`. A stopped (DONE) primary really starts again, where QEMU's
    /// ignores the start: the writes served meanwhile are dirty, and the resync sends them. No
    /// link is needed: a primary whose secondary is away runs degraded (every write dirty)
    /// until [`set_link`](Self::set_link).
    pub fn start(&self, mode: Mode) -> Result<(), PrimaryError> {
        let mut stage = self.inner.stage.lock();
        match *stage {
            Stage::None | Stage::Done => {}
            Stage::Running | Stage::Failover | Stage::FailoverFailed => {
                return Err(ReplicationError::RunningOrDone);
            }
        }
        self.check_start_mode(mode)?;
        *self.inner.shared.error.lock() = None;
        self.inner
            .shared
            .unrepairable
            .store(false, Ordering::SeqCst);
        *stage = Stage::Running;
        drop(stage);
        self.inner.resync.kick();
        Ok(())
    }

    /// Checks what [`start`](Self::start) checks, changing nothing.
    pub fn validate_start(&self, mode: Mode) -> Result<(), PrimaryError> {
        match self.stage() {
            Stage::None | Stage::Done => self.check_start_mode(mode),
            _ => Err(ReplicationError::RunningOrDone),
        }
    }

    fn check_start_mode(&self, mode: Mode) -> Result<(), PrimaryError> {
        if mode != Mode::Primary {
            let (needs, got) = (Mode::Primary.number(), mode.number());
            return Err(ReplicationError::InvalidMode { needs, got });
        }
        Ok(())
    }

    /// Undoes a start that a replication group could not complete on every disk, so the
    /// group's start is all-or-nothing. Changes forwarded meanwhile are harmless (the secondary
    /// only gained writes the primary also has); later ones are recorded as dirty again.
    pub fn reset_to_none(&self) {
        let mut stage = self.inner.stage.lock();
        if *stage == Stage::Running {
            *stage = Stage::None;
        }
    }

    /// `replication_get_error`.
    pub fn get_error(&self) -> Result<(), PrimaryError> {
        if self.stage() == Stage::None {
            return Err(ReplicationError::NotRunning);
        }
        match self.inner.shared.error.lock().is_some() {
            true => Err(ReplicationError::IoError),
            false => Ok(()),
        }
    }

    /// The sticky forwarding error, in full.
    pub fn error_detail(&self) -> Option<String> {
        self.inner.shared.error.lock().clone()
    }

    /// Waits until every change accepted before this call is acknowledged by the secondary
    /// (and flushed there if `flush`). Fails if forwarding failed since start, unless `force`.
    pub async fn drain(&self, flush: bool, force: bool) -> Result<(), PrimaryError> {
        let r = self
            .inner
            .forwarder
            .barrier(flush)
            .await
            .unwrap_or_else(|_| Err("forwarder stopped".into()));
        match r {
            Err(e) if !force => Err(PrimaryError::DrainFailed(e)),
            _ => Ok(()),
        }
    }

    /// `replication_do_checkpoint`: on the primary a drain barrier with flush (QEMU: a no-op,
    /// relying on the VM stop to drain), accepted only when the secondary then holds every
    /// write ([`protected`](Self::protected) before and after the drain: a forward may fail
    /// during it). `force` overrides a sticky forwarding error, nothing else.
    pub async fn checkpoint(&self, force: bool) -> Result<(), PrimaryError> {
        self.protected()?;
        self.drain(true, force).await?;
        self.protected()
    }

    /// `replication_stop(failover)`: the primary goes to DONE (error cleared) either way. Changes
    /// still queued are drained first, best effort, so a clean stop loses nothing in flight.
    pub async fn stop(&self, _failover: bool) -> Result<(), PrimaryError> {
        match self.stage() {
            Stage::None | Stage::FailoverFailed => return Err(ReplicationError::NotRunning),
            Stage::Done | Stage::Failover => return Ok(()),
            Stage::Running => {}
        }
        let _ = self.drain(false, true).await;
        *self.inner.stage.lock() = Stage::Done;
        *self.inner.shared.error.lock() = None;
        Ok(())
    }

    /// A snapshot for status displays and metrics.
    pub fn status(&self) -> PrimaryStatus {
        let s = &self.inner.shared;
        PrimaryStatus {
            stage: self.stage(),
            mode: self.inner.mode,
            error: s.error.lock().clone(),
            link_up: s.link.lock().is_some() && !s.link_down.load(Ordering::SeqCst),
            queued_requests: s.stats.queued_requests.load(Ordering::Relaxed),
            queued_bytes: s.stats.queued_bytes.load(Ordering::Relaxed),
            forwarded_writes: s.stats.forwarded_writes.load(Ordering::Relaxed),
            forwarded_bytes: s.stats.forwarded_bytes.load(Ordering::Relaxed),
            forward_errors: s.stats.forward_errors.load(Ordering::Relaxed),
            dirty_clusters: s.dirty.dirty_clusters(),
            dirty_bytes: s.dirty.dirty_bytes(),
            resync: self.resync_status(),
        }
    }

    /// Refuses every VM write from now on: the secondary has taken over, and a second writer
    /// would make two diverging disks (split brain). Reads go on.
    pub fn fence(&self) {
        if !self.inner.fenced.swap(true, Ordering::SeqCst) {
            tracing::error!("fenced: the secondary took over; VM writes are refused from now on");
        }
    }

    /// Whether [`fence`](Self::fence) was called.
    pub fn fenced(&self) -> bool {
        self.inner.fenced.load(Ordering::SeqCst)
    }

    /// Compares the local disk with the secondary's, `block` bytes at a time (a multiple of the
    /// dirty granularity), and marks what differs dirty, so the resync copies only that.
    /// Checkpoints are refused until the comparison ends. Run it with the node running and
    /// the link up: a VM write during the comparison then reaches both sides in order, so a
    /// block whose digests match can only differ where no write came, and that the digests
    /// saw.
    pub async fn checksum_sync(
        &self,
        remote: &dyn RemoteDigests,
        block: u64,
    ) -> Result<ChecksumReport, String> {
        let len = self.inner.local.len();
        // This comparison's share of the bytes left; what it did not count down (it failed
        // part-way) is taken off at the end. Another comparison running meanwhile keeps its own.
        let mine = AtomicU64::new(len);
        self.inner.comparing.fetch_add(len, Ordering::SeqCst);
        let r = checksum::compare(
            &self.inner.local,
            remote,
            &self.inner.shared.dirty,
            block,
            &self.inner.comparing,
            &mine,
        )
        .await;
        self.inner
            .comparing
            .fetch_sub(mine.load(Ordering::SeqCst), Ordering::SeqCst);
        self.inner.resync.kick();
        r
    }

    fn forwarding(&self) -> bool {
        self.stage() == Stage::Running
    }

    /// Applies a change locally, then hands it on: forwarded while running, recorded as dirty
    /// otherwise. Overlapping changes are ordered by the range lock.
    async fn apply<F>(&self, change: Change, local: F) -> Result<(), BlockError>
    where
        F: std::future::Future<Output = Result<(), BlockError>>,
    {
        let range = change.range();
        if self.fenced() && range.is_some() {
            let offset = range.map_or(0, |r| r.0);
            return Err(BlockError::new(
                blockdev::ErrorKind::ReadOnly,
                blockdev::Op::Write,
                offset,
            )
            .context("fenced: the secondary took over, this primary may not write"));
        }
        let guard = match range {
            Some((o, l)) => Some(self.inner.order.lock(o, l).await),
            None => None,
        };
        // In the log before the local write starts, held until the change is handed on.
        let _logged = match (self.inner.shared.log.get(), range) {
            (Some(log), Some((o, l))) => {
                let fail = |e: String| {
                    BlockError::new(blockdev::ErrorKind::Io(None), blockdev::Op::Write, o)
                        .context(format!("the write log: {e}"))
                };
                if (!self.forwarding() || self.inner.shared.usable_link().is_none())
                    && let Some(alone) = self.inner.alone.get()
                {
                    alone().map_err(fail)?;
                }
                Some(log.record(o, l).await.map_err(|e| fail(e.to_string()))?)
            }
            _ => None,
        };
        if !self.forwarding() {
            // Dirty whatever the outcome: a failed write may have changed part of the range.
            let r = local.await;
            self.mark_dirty(range);
            return r;
        }
        match self.inner.mode {
            ForwardMode::Async => {
                // A local failure always reaches the VM, and nothing is forwarded for it; it may
                // have changed part of the range (ENOSPC half-way), so the range is dirty.
                if let Err(e) = local.await {
                    self.mark_dirty(range);
                    return Err(e);
                }
                self.inner.forwarder.push(change, false).await;
                drop(guard);
            }
            ForwardMode::Sync => {
                // The local write and the forward run side by side, as in QEMU's quorum; the
                // range lock is held until both are done, so overlapping writes cannot overtake
                // each other on either side.
                let ack = self.inner.forwarder.push(change, true).await;
                let local_result = local.await;
                if let Some(ack) = ack {
                    // The VM waits for the secondary, but a forwarding failure is only recorded
                    // (sticky error, dirty range), never returned to the VM.
                    let _ = ack.await;
                }
                if local_result.is_err() {
                    // The secondary may now hold what the primary does not: marked before the
                    // range is released, so no check sees it clean meanwhile.
                    self.mark_dirty(range);
                }
                drop(guard);
                local_result?;
            }
        }
        Ok(())
    }

    fn mark_dirty(&self, range: Option<(u64, u64)>) {
        if let Some((o, l)) = range {
            self.inner.shared.dirty.mark(o, l);
            self.inner.resync.kick();
        }
    }
}

#[async_trait]
impl BlockDev for PrimaryNode {
    fn info(&self) -> DevInfo {
        self.inner.local.info()
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes, BlockError> {
        self.inner.local.read(offset, len).await
    }

    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<(), BlockError> {
        let local = self.inner.local.write(offset, data.clone(), flags);
        self.apply(
            Change::Write {
                offset,
                data,
                fua: flags.fua,
            },
            local,
        )
        .await
    }

    async fn flush(&self) -> Result<(), BlockError> {
        let local = self.inner.local.flush();
        self.apply(Change::Flush, local).await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> Result<(), BlockError> {
        let local = self.inner.local.write_zeroes(offset, len, flags);
        // The secondary may not be able to zero fast; it must zero all the same.
        let remote = ZeroFlags {
            fast_only: false,
            ..flags
        };
        self.apply(
            Change::Zeroes {
                offset,
                len,
                flags: remote,
            },
            local,
        )
        .await
    }

    /// A discard leaves content unspecified, and two disks could then differ (qemu-nbd
    /// ignores discards by default, a raw file reads zeroes, a qcow2 may fall through to its
    /// backing file). So the primary makes both sides read zeroes: write-zeroes with unmap
    /// locally and on the secondary, which still frees the space where the format can.
    async fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        let flags = ZeroFlags {
            may_unmap: true,
            ..Default::default()
        };
        let local = self.inner.local.write_zeroes(offset, len, flags);
        self.apply(Change::Zeroes { offset, len, flags }, local)
            .await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<ExtentList, BlockError> {
        self.inner.local.block_status(offset, len).await
    }
}
