//! Failover: merging the overlays into the secondary disk while the VM keeps running.
//!
//! The merge walks every cluster held by the hidden or the active overlay, in disk order, in
//! batches of consecutive clusters. For each batch it locks the clusters in the active table
//! (exclusive, so no VM write lands in them meanwhile), builds the view (hidden content, then
//! the active blocks over it: active wins), writes it to the disk, and then forgets the
//! clusters in both overlays. Store slots are not reused until the node is done, so a reader
//! that looked a cluster up just before it was forgotten still reads the right bytes.
//!
//! VM I/O during the merge (and after a failed merge, in FAILOVER_FAILED): reads see active,
//! hidden, disk as always. Writes, when the node keeps a merge record (module `journal`):
//! the clusters they touch that an overlay holds are merged first, then they go to the disk,
//! once the record says those clusters are merged. Without a record, QEMU's FAILOVER_FAILED
//! routing: a write to a cluster held by an overlay goes to the active overlay (and is merged
//! with it), any other write goes straight to the disk. A merged cluster is held by no overlay, so the merge never
//! has to revisit anything and always terminates. Reads are consistent throughout: a cluster's
//! disk bytes change only when they already equal its view, or when the VM writes them.
//!
//! When the walk is done the disk is flushed and, with I/O held off for a moment, the node
//! goes to DONE, empties the overlays and from then on serves the disk directly. A write error
//! leaves FAILOVER_FAILED with a sticky error; `stop(true)` retries with what is left.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use blockdev::{BlockError, ErrorKind, Op, Result, WriteFlags, ZeroFlags};
use bytes::{Bytes, BytesMut};

use super::hidden::Preserved;
use super::journal::Journal;
use super::piece::{Piece, coalesce, read_pieces_into, runs};
use super::{Node, ReplicationEvent, Stage};

/// Bytes merged per batch (one disk write when the batch is fully held by the overlays).
const MERGE_CHUNK: u64 = 4 << 20;

/// How far a failover merge has got, in bytes of the disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FailoverProgress {
    /// Bytes of clusters merged so far.
    pub done: u64,
    /// Bytes of clusters the merge had to do when it started.
    pub total: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Progress {
    done: AtomicU64,
    total: AtomicU64,
}

impl Progress {
    pub fn get(&self) -> FailoverProgress {
        FailoverProgress {
            done: self.done.load(Ordering::Relaxed),
            total: self.total.load(Ordering::Relaxed),
        }
    }

    pub fn reset(&self, total: u64) {
        self.total.store(total, Ordering::Relaxed);
        self.done.store(0, Ordering::Relaxed);
    }

    pub fn add(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }
}

/// State of one block while a batch is assembled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cover {
    Untouched,
    Data,
    Zero,
}

/// Enters FAILOVER and spawns the merge. The caller holds the gate exclusive, so the maps
/// are frozen while the merge record (if the node keeps one) is written.
pub(crate) async fn begin(node: &Arc<Node>) {
    node.status.lock().failed_over = true;
    let todo = node.dirty_clusters();
    // A retry after FAILOVER_FAILED keeps the first attempt's record: its maps hold what is
    // left, and its progress is still true.
    let dir = node.journal_dir.lock().clone();
    if node.journal().is_none()
        && let Some(dir) = dir
    {
        match node.write_record(&dir).await {
            Ok(Some(j)) => {
                tokio::spawn(j.clone().recorder());
                *node.journal.lock() = Some(j);
            }
            Ok(None) => tracing::warn!(
                "the overlays cannot outlive the process: a crash during this merge leaves \
                 a half-merged disk"
            ),
            Err(e) => tracing::warn!(
                error = %e,
                "no merge record: a crash during this merge leaves a half-merged disk"
            ),
        }
    }
    let total = todo.iter().map(|&c| node.geo.cluster_len(c)).sum();
    node.progress.reset(total);
    start(node, todo, total);
}

/// Goes to FAILOVER and spawns the merge of `todo`.
pub(crate) fn start(node: &Arc<Node>, todo: Vec<u64>, bytes: u64) {
    node.set_stage(Stage::Failover);
    tracing::info!(bytes, clusters = todo.len(), "failover merge starting");
    tokio::spawn(run(node.clone(), todo));
}

async fn run(node: Arc<Node>, todo: Vec<u64>) {
    let started = Instant::now();
    let buffers = &node.buffers;
    let mut result = merge(&node, &todo, buffers).await;
    let merged = started.elapsed();
    if result.is_ok() {
        result = node.disk.flush().await;
    }
    let flushed = started.elapsed() - merged;
    let _gate = node.gate.write().await;
    if result.is_ok() {
        // Nothing can have been added (VM writes merge what they touch first, then go to
        // the disk), but if it had, it is merged here, with the VM held off.
        let left = node.dirty_clusters();
        if !left.is_empty() {
            result = node.merge_batches(&left, buffers).await;
            if result.is_ok() {
                result = node.disk.flush().await;
            }
        }
    }
    // Recorded whole before DONE: from then on VM writes no longer wait for the record, and a
    // restart must not redo any cluster they may overwrite.
    let journal = node.journal();
    if result.is_ok()
        && let Some(j) = &journal
    {
        result = j.finish().await;
    }
    buffers.clear();
    match result {
        Ok(()) => {
            if let Some(j) = &journal {
                j.remove_files();
            }
            if let Err(e) = node.empty_overlays(true).await {
                tracing::warn!(error = %e, "failover done, but the overlays were not emptied");
            }
            node.status.lock().error = None;
            node.set_stage(Stage::Done);
            tracing::info!(
                merge_ms = merged.as_millis() as u64,
                flush_ms = flushed.as_millis() as u64,
                total_ms = started.elapsed().as_millis() as u64,
                "failover done: serving the secondary disk"
            );
            node.emit(ReplicationEvent::FailoverDone {
                merged: node.progress.get().total,
            });
        }
        Err(e) => {
            tracing::error!(error = %e, "failover merge failed");
            let error = e.to_string();
            node.status.lock().error = Some(e);
            node.set_stage(Stage::FailoverFailed);
            node.emit(ReplicationEvent::FailoverFailed { error });
        }
    }
}

/// Batches merged at once: reading the next batch's overlays overlaps writing the last one's
/// view into the disk (batches are disjoint, each holds its own cluster locks).
const MERGE_PARALLEL: usize = 4;

/// Bytes merged between two flushes started while the merge goes on. The disk's page cache
/// is written back while later batches are merged, so the flush that ends the merge has only
/// the tail left to wait for (a plain copy followed by one fdatasync does the two in turn).
const WRITEBACK_EVERY: u64 = 32 << 20;

/// Batch buffers, reused: a fresh 4 MiB allocation per batch costs page faults and zeroing,
/// which on a merge of hundreds of MiB were as much CPU as the copying itself.
#[derive(Default)]
pub(crate) struct Buffers(parking_lot::Mutex<Vec<BytesMut>>);

impl Buffers {
    /// Gives the memory back once the merge is over.
    fn clear(&self) {
        self.0.lock().clear();
    }

    /// A buffer of `len` bytes; its content is whatever the last batch left (every byte the
    /// batch writes is read into it first).
    fn take(&self, len: usize) -> BytesMut {
        let mut b = self
            .0
            .lock()
            .pop()
            .unwrap_or_else(|| BytesMut::zeroed(MERGE_CHUNK as usize));
        b.resize(len, 0);
        b
    }

    /// Takes a buffer back once nothing else holds it.
    fn give(&self, b: Bytes) {
        if let Ok(b) = b.try_into_mut() {
            self.0.lock().push(b);
        }
    }
}

/// The merge proper: batch by batch, each under the gate's shared side, a few at a time, with
/// the disk flushed in the background every [`WRITEBACK_EVERY`] bytes.
async fn merge(node: &Node, todo: &[u64], buffers: &Buffers) -> Result<()> {
    use futures::stream::{self, StreamExt};
    let mut batches = stream::iter(runs(todo, MERGE_CHUNK / node.geo.cluster))
        .map(|run| async move {
            let _gate = node.gate.read().await;
            node.merge_run(run, buffers).await
        })
        .buffer_unordered(MERGE_PARALLEL);
    let mut writeback: Option<tokio::task::JoinHandle<Result<()>>> = None;
    let mut since = 0;
    let mut result = Ok(());
    while let Some(r) = batches.next().await {
        match r {
            Ok(n) => since += n,
            Err(e) => {
                result = Err(e);
                break;
            }
        }
        if since >= WRITEBACK_EVERY && writeback.as_ref().is_none_or(|h| h.is_finished()) {
            if let Some(h) = writeback.take() {
                joined(h.await)?;
            }
            let disk = node.disk.clone();
            writeback = Some(tokio::spawn(async move {
                disk.flush()
                    .await
                    .map_err(|e| e.context("flushing the disk during the merge"))
            }));
            since = 0;
        }
    }
    // A flush's error must not be lost: the kernel reports a write-back error to one fdatasync
    // only, so the final flush could succeed after this one saw it.
    if let Some(h) = writeback {
        let flushed = joined(h.await);
        result = result.and(flushed);
    }
    result
}

/// A background flush's result, a panic in it counting as an I/O error.
fn joined(r: std::result::Result<Result<()>, tokio::task::JoinError>) -> Result<()> {
    r.unwrap_or_else(|e| {
        Err(BlockError::new(ErrorKind::Io(None), Op::Flush, 0)
            .context(format!("background flush during the merge: {e}")))
    })
}

impl Node {
    /// Clusters held by either overlay, ascending.
    pub(crate) fn dirty_clusters(&self) -> Vec<u64> {
        let mut v = self.hidden.clusters();
        v.extend(self.active.clusters());
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Merges `todo` (ascending) without taking the gate (the caller holds it).
    async fn merge_batches(&self, todo: &[u64], buffers: &Buffers) -> Result<()> {
        for run in runs(todo, MERGE_CHUNK / self.geo.cluster) {
            self.merge_run(run, buffers).await?;
        }
        Ok(())
    }

    /// Merges `held` (ascending) now, for a VM write about to go to the disk there.
    pub(crate) async fn merge_now(&self, held: &[u64]) -> Result<()> {
        self.merge_batches(held, &self.buffers).await
    }

    /// Writes the merge record into `dir`: names the overlays' store files and saves the
    /// frozen maps. `None` when a store cannot be named (its content dies with the process).
    async fn write_record(&self, dir: &std::path::Path) -> Result<Option<Arc<Journal>>> {
        let Some(active_file) = self.active.store.keep("merge-active")? else {
            return Ok(None);
        };
        let Some(hidden_file) = self.hidden.store.keep("merge-hidden")? else {
            let _ = std::fs::remove_file(&active_file);
            return Ok(None);
        };
        let (hidden, active) = (self.hidden.entries(), self.active.entries());
        let (dir, geo) = (dir.to_path_buf(), self.geo);
        let boot = crate::state::boot_id();
        let files = [active_file.clone(), hidden_file.clone()];
        let r = tokio::task::spawn_blocking(move || {
            Journal::create(&dir, geo, boot, active_file, hidden_file, &hidden, &active)
        })
        .await
        .unwrap_or_else(|e| {
            Err(BlockError::new(ErrorKind::Io(None), Op::Write, 0)
                .context(format!("writing the merge record: {e}")))
        });
        if r.is_err() {
            files.iter().for_each(|f| drop(std::fs::remove_file(f)));
        }
        r.map(|j| Some(Arc::new(j)))
    }

    /// Merges consecutive clusters into the disk and forgets them; returns the bytes merged.
    /// Clusters no overlay holds any more (a VM write merged them first) are left alone.
    async fn merge_run(&self, run: Range<u64>, buffers: &Buffers) -> Result<u64> {
        let g = self.geo;
        let clusters: Vec<u64> = run.clone().collect();
        let _guard = self.active.locks.exclusive(&clusters).await;
        let held: Vec<u64> = clusters
            .into_iter()
            .filter(|&c| self.held_by_overlay(c))
            .collect();
        let (Some(&first), Some(&last)) = (held.first(), held.last()) else {
            return Ok(0);
        };
        let run = first..last + 1;
        let base = g.start(run.start);
        let end = g.start(run.end - 1) + g.cluster_len(run.end - 1);
        let buf = buffers.take((end - base) as usize);
        let mut cover = vec![Cover::Untouched; (end - base).div_ceil(g.block) as usize];
        let block_index = |c: u64, b: u32| ((g.start(c) - base) / g.block) as usize + b as usize;
        let blocks_per_cluster = |c: u64| g.cluster_len(c).div_ceil(g.block) as u32;

        // The hidden overlay first...
        let mut pieces = Vec::new();
        for c in run.clone() {
            let (state, piece) = match self.hidden.get(c) {
                None => continue,
                Some(Preserved::Zero) => (Cover::Zero, None),
                Some(Preserved::Data(slot)) => (
                    Cover::Data,
                    Some(Piece {
                        pos: u64::from(slot) * g.cluster,
                        at: (g.start(c) - base) as usize,
                        len: g.cluster_len(c) as usize,
                    }),
                ),
            };
            pieces.extend(piece);
            for b in 0..blocks_per_cluster(c) {
                cover[block_index(c, b)] = state;
            }
        }
        let mut buf = read_pieces_into(&*self.hidden.store, coalesce(pieces), buf).await?;

        // ...then the active overlay over it.
        let mut pieces = Vec::new();
        for c in run.clone() {
            let Some(a) = self.active.get(c) else {
                continue;
            };
            let at = (g.start(c) - base) as usize;
            for r in a.zero.runs() {
                let bytes = g.block_bytes(c, &r);
                buf[at + bytes.start as usize..at + bytes.end as usize].fill(0);
                r.clone()
                    .for_each(|b| cover[block_index(c, b)] = Cover::Zero);
            }
            let data = a.data();
            if data.is_empty() {
                continue;
            }
            let slot = a.slot().ok_or_else(|| lost_slot(g.start(c)))?;
            for r in data.runs() {
                let bytes = g.block_bytes(c, &r);
                pieces.push(Piece {
                    pos: u64::from(slot) * g.cluster + bytes.start,
                    at: at + bytes.start as usize,
                    len: (bytes.end - bytes.start) as usize,
                });
                r.clone()
                    .for_each(|b| cover[block_index(c, b)] = Cover::Data);
            }
        }
        let buf = read_pieces_into(&*self.active.store, coalesce(pieces), buf).await?;

        // Write the view, one I/O per run of blocks of one kind.
        let buf = buf.freeze();
        let mut i = 0;
        while i < cover.len() {
            let state = cover[i];
            let mut j = i + 1;
            while j < cover.len() && cover[j] == state {
                j += 1;
            }
            let lo = i as u64 * g.block;
            let hi = (j as u64 * g.block).min(end - base);
            match state {
                Cover::Untouched => {}
                Cover::Data => {
                    let data = buf.slice(lo as usize..hi as usize);
                    self.disk
                        .write(base + lo, data, WriteFlags::default())
                        .await?;
                }
                Cover::Zero => {
                    self.disk
                        .write_zeroes(base + lo, hi - lo, ZeroFlags::default())
                        .await?;
                }
            }
            i = j;
        }
        buffers.give(buf);

        // Marked merged before it is forgotten: a VM write that then finds the cluster held
        // by no overlay waits for a record that covers it.
        if let Some(j) = self.journal() {
            j.mark(&held);
        }
        let mut merged = 0;
        for &c in &held {
            self.active.remove(c);
            self.hidden.remove(c);
            self.progress.add(g.cluster_len(c));
            merged += g.cluster_len(c);
        }
        let p = self.progress.get();
        self.emit(ReplicationEvent::FailoverProgress {
            done: p.done,
            total: p.total,
        });
        Ok(merged)
    }
}

/// An active cluster with data blocks but no slot: cannot happen (slots are reserved before
/// any block is recorded); reported rather than trusted.
pub(crate) fn lost_slot(offset: u64) -> BlockError {
    BlockError::new(ErrorKind::Io(None), Op::Read, offset).context("active overlay lost a slot")
}
