//! The secondary replication node: the disk buffer that lets a speculative VM run on the
//! secondary while the primary's writes keep arriving.
//!
//! ```text
//!   primary (NBD) --> ReplicaPath                     TopPath <-- speculative VM (NBD)
//!                       | write/zero/discard:           | write: active overlay
//!                       |  1. copy-before-write -----.  | read:  active -> hidden -> disk
//!                       |  2. write the disk         |  |
//!                       v                            v  v
//!              +----------------+   +----------------+   +----------------+
//!              | secondary disk | < | hidden overlay | < | active overlay |
//!              | (Arc<BlockDev>)|   | old content of |   | the VM's own   |
//!              |  = primary disk|   | clusters the   |   | writes since   |
//!              |                |   | primary changed|   | the checkpoint |
//!              +----------------+   +----------------+   +----------------+
//! ```
//!
//! The VM's view is `active ∪ hidden ∪ disk` (docs/qemu-replication.md §1.7): the primary's writes never change
//! it, because the old content of every cluster they touch is preserved in the hidden overlay
//! first (module `epoch`). A checkpoint forgets both overlays (view == disk == primary disk); a
//! failover merges them into the disk while the VM keeps running (module `failover`), so the disk
//! becomes the VM's view and the primary's writes since the last checkpoint are rolled back.
//!
//! The stage machine is QEMU's (see [`Stage`] and `DIFFERENCES.md` for where we do better).
//! Control operations ([`SecondaryNode::start`], `checkpoint`, `stop`) exclude all I/O for
//! their duration (a gate every request holds shared), so they see a quiet node; the
//! failover merge takes the gate per batch only, so the VM is never held up for long.

mod active;
mod checkpoint;
mod cluster_lock;
mod epoch;
mod failover;
mod geometry;
mod hidden;
mod journal;
mod overlay;
mod piece;
mod replica;
mod store;
mod top;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use blockdev::{BlockDev, BlockError, ErrorKind, IoPool, Op};
use parking_lot::Mutex;
use tokio::sync::{RwLock, broadcast, watch};

use crate::{Mode, ReplicationError, ReplicationEvent, Stage};
pub use failover::FailoverProgress;
pub use geometry::{DEFAULT_CLUSTER_SIZE, MAX_CLUSTER_SIZE, MIN_CLUSTER_SIZE};
pub use overlay::{DevOverlay, Overlay};
pub use replica::ReplicaPath;
pub use store::{FileStore, MemoryStore};
pub use top::TopPath;

use active::Active;
use epoch::Epoch;
use failover::Progress;
use geometry::Geometry;
use hidden::Hidden;
use journal::Journal;

/// Where the internal overlays keep their bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OverlayStore {
    /// In memory.
    Memory,
    /// In unlinked sparse files in this directory (tmpfs recommended).
    BufferDir(PathBuf),
}

impl Default for OverlayStore {
    fn default() -> Self {
        OverlayStore::BufferDir(std::env::temp_dir())
    }
}

/// How to build a [`SecondaryNode`] with internal overlays.
#[derive(Debug, Clone)]
pub struct SecondaryConfig {
    /// Copy-before-write cluster size: a power of two from 512 bytes to 16 MiB.
    pub cluster_size: u64,
    /// Where the overlays keep their bytes.
    pub store: OverlayStore,
    /// Blocking pool for the store files.
    pub pool: IoPool,
}

impl Default for SecondaryConfig {
    fn default() -> Self {
        SecondaryConfig {
            cluster_size: DEFAULT_CLUSTER_SIZE,
            store: OverlayStore::default(),
            pool: IoPool::default(),
        }
    }
}

/// A snapshot of the node's state, for status queries and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeStatus {
    /// Where the node is in the stage machine.
    pub stage: Stage,
    /// The sticky error's detail, if any.
    pub error: Option<String>,
    /// Clusters the VM wrote since the last checkpoint.
    pub active_clusters: usize,
    /// Clusters preserved by copy-before-write since the last checkpoint.
    pub hidden_clusters: usize,
    /// Copy-before-write granularity.
    pub cluster_size: u64,
    /// Merge progress of the current or last failover.
    pub failover: FailoverProgress,
    /// The merge was begun by a process that died, and this one resumed it.
    pub resumed: bool,
}

/// Mutable state, changed under the gate's write side (except the sticky error, which the
/// data paths may set at any time).
#[derive(Debug)]
struct Status {
    stage: Stage,
    error: Option<BlockError>,
    /// `stop(true)` has been called: the primary's writes are refused from now on.
    failed_over: bool,
}

/// Everything the node and its two paths share.
pub(crate) struct Node {
    geo: Geometry,
    disk: Arc<dyn BlockDev>,
    active: Active,
    hidden: Hidden,
    epoch: Epoch,
    /// Held shared by every request, exclusive by control operations.
    gate: RwLock<()>,
    status: Mutex<Status>,
    stage_tx: watch::Sender<Stage>,
    progress: Progress,
    events: broadcast::Sender<ReplicationEvent>,
    /// Where a failover writes its merge record (the disk's state directory), if anywhere.
    journal_dir: Mutex<Option<PathBuf>>,
    /// The running (or last) merge's record.
    journal: Mutex<Option<Arc<Journal>>>,
    /// The merge was resumed from a record.
    resumed: std::sync::atomic::AtomicBool,
    /// The merge's batch buffers.
    buffers: failover::Buffers,
}

impl Node {
    fn journal(&self) -> Option<Arc<Journal>> {
        self.journal.lock().clone()
    }

    fn emit(&self, event: ReplicationEvent) {
        let _ = self.events.send(event);
    }

    fn stage(&self) -> Stage {
        self.status.lock().stage
    }

    fn set_stage(&self, stage: Stage) {
        let mut st = self.status.lock();
        if st.stage != stage {
            tracing::info!(from = %st.stage, to = %stage, "replication stage");
        }
        st.stage = stage;
        self.stage_tx.send_replace(stage);
    }

    /// Makes `e` the sticky error (the first one is kept: it is the cause).
    fn set_error(&self, e: &BlockError) {
        tracing::warn!(error = %e, "secondary replication error");
        let first = {
            let mut st = self.status.lock();
            let first = st.error.is_none();
            if first {
                st.error = Some(e.clone());
            }
            first
        };
        if first {
            self.emit(ReplicationEvent::Error {
                error: e.to_string(),
            });
        }
    }

    fn not_running(op: Op, offset: u64) -> BlockError {
        BlockError::new(ErrorKind::Io(None), op, offset).context("block replication is not running")
    }
}

/// A secondary replication node over a secondary disk, with its active and hidden overlays.
///
/// Cheap to clone; clones share the node.
#[derive(Clone)]
pub struct SecondaryNode {
    node: Arc<Node>,
}

impl SecondaryNode {
    /// A node with internal overlays (memory or buffer-directory files).
    pub fn new(disk: Arc<dyn BlockDev>, config: SecondaryConfig) -> Result<Self, ReplicationError> {
        let len = disk.len();
        let (active, hidden): (Arc<dyn Overlay>, Arc<dyn Overlay>) = match &config.store {
            OverlayStore::Memory => (
                Arc::new(MemoryStore::new(len)),
                Arc::new(MemoryStore::new(len)),
            ),
            OverlayStore::BufferDir(dir) => (
                Arc::new(
                    FileStore::create(dir, len, config.pool.clone())
                        .map_err(ReplicationError::Store)?,
                ),
                Arc::new(
                    FileStore::create(dir, len, config.pool.clone())
                        .map_err(ReplicationError::Store)?,
                ),
            ),
        };
        Self::with_overlays(disk, config.cluster_size, active, hidden)
    }

    /// A node with overlays of the caller's choice (e.g. [`DevOverlay`] over a qcow2 image).
    /// Their lengths and ability to be emptied are checked at [`start`](Self::start), as
    /// QEMU does.
    pub fn with_overlays(
        disk: Arc<dyn BlockDev>,
        cluster_size: u64,
        active: Arc<dyn Overlay>,
        hidden: Arc<dyn Overlay>,
    ) -> Result<Self, ReplicationError> {
        let geo = Geometry::new(disk.len(), cluster_size)?;
        let (stage_tx, _) = watch::channel(Stage::None);
        let (events, _) = broadcast::channel(256);
        Ok(SecondaryNode {
            node: Arc::new(Node {
                geo,
                disk,
                active: Active::new(active),
                hidden: Hidden::new(hidden),
                epoch: Epoch::default(),
                gate: RwLock::new(()),
                status: Mutex::new(Status {
                    stage: Stage::None,
                    error: None,
                    failed_over: false,
                }),
                stage_tx,
                progress: Progress::default(),
                events,
                journal_dir: Mutex::new(None),
                journal: Mutex::new(None),
                resumed: false.into(),
                buffers: failover::Buffers::default(),
            }),
        })
    }

    /// The path the primary's forwarded writes take (serve it as the NBD export the primary
    /// connects to).
    pub fn replica(&self) -> ReplicaPath {
        ReplicaPath::new(self.node.clone())
    }

    /// The path the speculative VM uses.
    pub fn top(&self) -> TopPath {
        TopPath::new(self.node.clone())
    }

    /// The secondary disk.
    pub fn disk(&self) -> &Arc<dyn BlockDev> {
        &self.node.disk
    }

    /// Copy-before-write cluster size.
    pub fn cluster_size(&self) -> u64 {
        self.node.geo.cluster
    }

    /// Where the node is in the stage machine.
    pub fn stage(&self) -> Stage {
        self.node.stage()
    }

    /// The sticky error's detail.
    pub fn last_error(&self) -> Option<BlockError> {
        self.node.status.lock().error.clone()
    }

    /// Forgets the sticky error, so that checkpoints are accepted again: the operator's way of
    /// saying "the secondary disk is known good again" (e.g. after a resync). Has no effect in
    /// FAILOVER_FAILED, where the error is the stage itself.
    pub fn clear_error(&self) {
        let mut st = self.node.status.lock();
        if st.stage != Stage::FailoverFailed {
            st.error = None;
        }
    }

    /// Subscribes to the node's events (errors, failover progress and end).
    pub fn events(&self) -> broadcast::Receiver<ReplicationEvent> {
        self.node.events.subscribe()
    }

    /// Merge progress of the current (or last) failover.
    pub fn failover_progress(&self) -> FailoverProgress {
        self.node.progress.get()
    }

    /// A snapshot for status displays and metrics.
    pub fn status(&self) -> NodeStatus {
        let (stage, error) = {
            let st = self.node.status.lock();
            (st.stage, st.error.as_ref().map(ToString::to_string))
        };
        NodeStatus {
            stage,
            error,
            active_clusters: self.node.active.count(),
            hidden_clusters: self.node.hidden.count(),
            cluster_size: self.node.geo.cluster,
            failover: self.failover_progress(),
            resumed: self.node.resumed.load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// Starts replication (QEMU `replication_start`): checks the mode, the overlay lengths and
    /// that they can be emptied, then empties them (the initial checkpoint) and arms
    /// copy-before-write. Ignored in FAILOVER and DONE (continuous replication). On failure the
    /// node stays in NONE and can be started again.
    pub async fn start(&self, mode: Mode) -> Result<(), ReplicationError> {
        self.node.start(mode).await
    }

    /// Checks what [`start`](Self::start) checks, changing nothing.
    pub fn validate_start(&self, mode: Mode) -> Result<(), ReplicationError> {
        self.node.check_start(mode).map(|_| ())
    }

    /// Returns a started node to NONE, discarding the overlays (the rollback of a group start).
    pub async fn undo_start(&self) -> Result<(), ReplicationError> {
        self.node.undo_start().await
    }

    /// A checkpoint (QEMU `replication_do_checkpoint`): forgets what copy-before-write
    /// preserved, empties the active then the hidden overlay. Afterwards the VM's view is the
    /// secondary disk. Refused while a sticky error stands (the disk may lack a primary write).
    pub async fn checkpoint(&self) -> Result<(), ReplicationError> {
        self.node.checkpoint().await
    }

    /// Checks what [`checkpoint`](Self::checkpoint) checks, changing nothing.
    pub fn validate_checkpoint(&self) -> Result<(), ReplicationError> {
        self.node.check_checkpoint().map(|_| ())
    }

    /// QEMU `replication_get_error`: "Block replication is not running" in NONE, "I/O error
    /// occurred" while a sticky error stands.
    pub fn get_error(&self) -> Result<(), ReplicationError> {
        self.node.get_error()
    }

    /// Stops replication (QEMU `replication_stop`). With `failover`, starts merging the
    /// overlays into the secondary disk in the background and returns (see
    /// [`wait_failover`](Self::wait_failover)); from FAILOVER_FAILED this retries the merge.
    /// Without, discards the overlays and goes to DONE.
    pub async fn stop(&self, failover: bool) -> Result<(), ReplicationError> {
        self.node.stop(failover).await
    }

    /// Makes a failover write its merge record into `dir` (the disk's state directory), so
    /// that a merge cut short by a crash of the process can be [resumed](Self::resume). Only
    /// overlays that can outlive the process (buffer-directory files) are recorded; with
    /// others a crash during the merge leaves a half-merged disk.
    pub fn keep_merge_record_in(&self, dir: PathBuf) {
        *self.node.journal_dir.lock() = Some(dir);
    }

    /// Whether `dir` holds a merge record.
    pub fn has_merge_record(dir: &Path) -> bool {
        dir.join("merge").exists()
    }

    /// Resumes the failover merge recorded in `dir` by a process that died: the node comes
    /// back in FAILOVER with the frozen maps of the clusters not recorded merged, merges them
    /// again (the same bytes: no VM write touched them since), records the end and goes to
    /// DONE. `Ok(None)` when `dir` holds no record. Refused when the record was written
    /// in another boot of the host (`this_boot` is [`crate::state::boot_id`]): the overlays'
    /// bytes were never flushed and cannot be trusted. `pool` serves the store files. Must
    /// run inside a tokio runtime.
    pub fn resume(
        disk: Arc<dyn BlockDev>,
        pool: IoPool,
        dir: &Path,
        this_boot: Option<&str>,
    ) -> Result<Option<Self>, ReplicationError> {
        let fail = |why: String| ReplicationError::CannotResume {
            dir: dir.to_path_buf(),
            why,
        };
        let Some(rec) = Journal::load(dir).map_err(fail)? else {
            return Ok(None);
        };
        if rec.boot.is_none() || rec.boot.as_deref() != this_boot {
            return Err(fail(format!(
                "it was written in another boot of this host ({}, now {}): the overlays' \
                 buffers did not survive the restart (or were never flushed) and cannot be \
                 trusted",
                rec.boot.as_deref().unwrap_or("unknown"),
                this_boot.unwrap_or("unknown")
            )));
        }
        if rec.len != disk.len() {
            return Err(fail(format!(
                "it is for a {}-byte disk, this one has {} bytes",
                rec.len,
                disk.len()
            )));
        }
        let left = rec.journal.unrecorded();
        let (active, hidden): (Arc<dyn Overlay>, Arc<dyn Overlay>) = if left.is_empty() {
            // Everything is merged: the store files are not needed (and may be gone).
            (
                Arc::new(MemoryStore::new(rec.len)),
                Arc::new(MemoryStore::new(rec.len)),
            )
        } else {
            let open = |p: &Path| {
                FileStore::open_kept(p, rec.len, pool.clone()).map_err(|e| fail(e.to_string()))
            };
            (
                Arc::new(open(&rec.active_file)?),
                Arc::new(open(&rec.hidden_file)?),
            )
        };
        let me = Self::with_overlays(disk, rec.cluster, active, hidden)?;
        let node = &me.node;
        let keep = |c: u64| left.binary_search(&c).is_ok();
        for &(c, raw) in rec.hidden.iter().filter(|e| keep(e.0)) {
            node.hidden.restore(c, raw);
        }
        for &e in rec.active.iter().filter(|e| keep(e.0)) {
            node.active.restore(e);
        }
        *node.journal_dir.lock() = Some(dir.to_path_buf());
        tokio::spawn(rec.journal.clone().recorder());
        *node.journal.lock() = Some(rec.journal);
        node.status.lock().failed_over = true;
        node.resumed
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let g = node.geo;
        let all: u64 = rec
            .hidden
            .iter()
            .map(|e| e.0)
            .chain(rec.active.iter().filter(|e| e.2 != 0).map(|e| e.0))
            .collect::<std::collections::BTreeSet<u64>>()
            .into_iter()
            .map(|c| g.cluster_len(c))
            .sum();
        let todo = node.dirty_clusters();
        let bytes: u64 = todo.iter().map(|&c| g.cluster_len(c)).sum();
        node.progress.reset(all);
        node.progress.add(all - bytes);
        tracing::warn!(
            dir = %dir.display(),
            bytes_left = bytes,
            "resuming a failover merge cut short by the death of the process"
        );
        failover::start(node, todo, bytes);
        Ok(Some(me))
    }

    /// Removes the merge record in `dir` and the store files it names: once the merge's end
    /// is recorded where the caller looks first (the disk's state), or when the record is
    /// stale.
    pub fn discard_merge_record(dir: &Path) -> std::io::Result<()> {
        Journal::discard(dir)
    }

    /// Waits until no failover merge is running; `Err(IoError)` if the node is in
    /// FAILOVER_FAILED.
    pub async fn wait_failover(&self) -> Result<(), ReplicationError> {
        let mut rx = self.node.stage_tx.subscribe();
        let stage = match rx.wait_for(|s| *s != Stage::Failover).await {
            Ok(s) => *s,
            Err(_) => return Err(ReplicationError::NotRunning),
        };
        match stage {
            Stage::FailoverFailed => Err(ReplicationError::IoError),
            _ => Ok(()),
        }
    }
}

impl std::fmt::Debug for SecondaryNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecondaryNode")
            .field("stage", &self.stage())
            .field("len", &self.node.geo.len)
            .field("cluster_size", &self.node.geo.cluster)
            .finish()
    }
}
