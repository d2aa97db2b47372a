//! Failover: merging the overlays into the secondary disk while the VM keeps running.
//!
//! The merge walks every cluster held by the hidden or the active overlay, in disk order, in
//! batches of consecutive clusters. For each batch it locks the clusters in the active table
//! (exclusive, so no VM write lands in them meanwhile), builds the view (hidden content, then
//! the active blocks over it: active wins), writes it to the disk, and then forgets the
//! clusters in both overlays. Store slots are not reused until the node is done, so a reader
//! that looked a cluster up just before it was forgotten still reads the right bytes.
//!
//! VM I/O during the merge (and after a failed merge, in FAILOVER_FAILED) follows QEMU's
//! FAILOVER_FAILED routing: a write to a cluster held by an overlay goes to the active
//! overlay (and is merged with it), any other write goes straight to the disk; reads see
//! active, hidden, disk as always. A merged cluster is held by no overlay, so the merge never
//! has to revisit anything and always terminates. Reads are consistent throughout: a cluster's
//! disk bytes change only when they already equal its view, or when the VM writes them.
//!
//! When the walk is done the disk is flushed and, with I/O held off for a moment, the node
//! goes to DONE, empties the overlays and from then on serves the disk directly. A write error
//! leaves FAILOVER_FAILED with a sticky error; `stop(true)` retries with what is left.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use blockdev::{BlockError, ErrorKind, Op, Result, WriteFlags, ZeroFlags};
use bytes::BytesMut;

use super::hidden::Preserved;
use super::piece::{Piece, coalesce, read_pieces, runs};
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

    fn add(&self, n: u64) {
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

/// Enters FAILOVER and spawns the merge. The caller holds the gate exclusive.
pub(crate) fn begin(node: &Arc<Node>) {
    node.status.lock().failed_over = true;
    let todo = node.dirty_clusters();
    let total = todo.iter().map(|&c| node.geo.cluster_len(c)).sum();
    node.progress.reset(total);
    node.set_stage(Stage::Failover);
    tracing::info!(
        bytes = total,
        clusters = todo.len(),
        "failover merge starting"
    );
    tokio::spawn(run(node.clone(), todo));
}

async fn run(node: Arc<Node>, todo: Vec<u64>) {
    let mut result = merge(&node, &todo).await;
    if result.is_ok() {
        result = node.disk.flush().await;
    }
    let _gate = node.gate.write().await;
    if result.is_ok() {
        // Nothing can have been added (VM writes to merged clusters go to the disk), but if it
        // had, it is merged here, with the VM held off.
        let left = node.dirty_clusters();
        if !left.is_empty() {
            result = node.merge_batches(&left).await;
            if result.is_ok() {
                result = node.disk.flush().await;
            }
        }
    }
    match result {
        Ok(()) => {
            if let Err(e) = node.empty_overlays(true).await {
                tracing::warn!(error = %e, "failover done, but the overlays were not emptied");
            }
            node.status.lock().error = None;
            node.set_stage(Stage::Done);
            tracing::info!("failover done: serving the secondary disk");
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

/// The merge proper: batch by batch, each under the gate's shared side, a few at a time.
async fn merge(node: &Node, todo: &[u64]) -> Result<()> {
    use futures::stream::{self, StreamExt, TryStreamExt};
    stream::iter(runs(todo, MERGE_CHUNK / node.geo.cluster))
        .map(|run| async move {
            let _gate = node.gate.read().await;
            node.merge_run(run).await
        })
        .buffer_unordered(MERGE_PARALLEL)
        .try_collect::<()>()
        .await
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
    async fn merge_batches(&self, todo: &[u64]) -> Result<()> {
        for run in runs(todo, MERGE_CHUNK / self.geo.cluster) {
            self.merge_run(run).await?;
        }
        Ok(())
    }

    /// Merges consecutive clusters into the disk and forgets them.
    async fn merge_run(&self, run: Range<u64>) -> Result<()> {
        let g = self.geo;
        let clusters: Vec<u64> = run.clone().collect();
        let _guard = self.active.locks.exclusive(&clusters).await;
        let base = g.start(run.start);
        let end = g.start(run.end - 1) + g.cluster_len(run.end - 1);
        let mut buf = BytesMut::zeroed((end - base) as usize);
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
        read_pieces(&*self.hidden.store, &coalesce(pieces), &mut buf).await?;

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
        read_pieces(&*self.active.store, &coalesce(pieces), &mut buf).await?;

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

        for c in run.clone() {
            self.active.remove(c);
            self.hidden.remove(c);
            self.progress.add(g.cluster_len(c));
        }
        let p = self.progress.get();
        self.emit(ReplicationEvent::FailoverProgress {
            done: p.done,
            total: p.total,
        });
        Ok(())
    }
}

/// An active cluster with data blocks but no slot: cannot happen (slots are reserved before
/// any block is recorded); reported rather than trusted.
pub(crate) fn lost_slot(offset: u64) -> BlockError {
    BlockError::new(ErrorKind::Io(None), Op::Read, offset).context("active overlay lost a slot")
}
