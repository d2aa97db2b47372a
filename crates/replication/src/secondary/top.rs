//! The top path: the disk as the speculative VM sees it.
//!
//! | stage                    | reads                        | writes, zeroes, discards           |
//! |--------------------------|------------------------------|------------------------------------|
//! | NONE                     | EIO                          | EIO                                |
//! | RUNNING                  | active -> hidden -> disk     | active overlay                     |
//! | FAILOVER, FAILOVER_FAILED| active -> hidden -> disk     | with a merge record: the disk, once the clusters an overlay holds are merged and recorded; without: active if the cluster is held by an overlay, else the disk (QEMU's FAILOVER_FAILED routing) |
//! | DONE                     | disk                         | disk                               |
//!
//! In the active overlay, whole blocks are written as they come; a block the request covers
//! only partly is first read from the current view (read-modify-write of at most the two edge
//! blocks, under an exclusive lock on their clusters so that two such writes cannot lose each
//! other's bytes). Zeroes and discards of whole blocks are recorded as zero blocks, without
//! data, so they read back as zeroes.

use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use blockdev::{
    BlockDev, DevInfo, Extent, ExtentList, Op, Result, WriteFlags, ZeroFlags, check_range,
    check_status_range, check_write,
};
use bytes::{Bytes, BytesMut};

use super::active::ActiveCluster;
use super::failover::lost_slot;
use super::geometry::Blocks;
use super::hidden::Preserved;
use super::piece::{Piece, coalesce, push_span, read_pieces};
use super::{Node, Stage};

/// Most clusters described by one block-status answer (callers ask again for the rest).
const STATUS_CLUSTERS: u64 = 16384;

/// The disk as the speculative VM sees it. See the module docs.
#[derive(Clone)]
pub struct TopPath {
    node: Arc<Node>,
}

/// What a VM write-class request carries.
#[derive(Debug, Clone)]
pub(crate) enum Content {
    Data(Bytes),
    Zero(u64, ZeroFlags),
    Discard(u64),
}

impl Content {
    fn len(&self) -> u64 {
        match self {
            Content::Data(d) => d.len() as u64,
            Content::Zero(n, _) | Content::Discard(n) => *n,
        }
    }

    /// The part of the request at `r` (relative to its start).
    fn slice(&self, r: Range<u64>) -> Content {
        match self {
            Content::Data(d) => Content::Data(d.slice(r.start as usize..r.end as usize)),
            Content::Zero(_, f) => Content::Zero(r.end - r.start, *f),
            Content::Discard(_) => Content::Discard(r.end - r.start),
        }
    }
}

/// Where a block of the view comes from, as far as the active overlay knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Below,
    Data,
    Zero,
}

fn class(a: &ActiveCluster, b: u32) -> Class {
    if !a.alloc.contains(b) {
        Class::Below
    } else if a.zero.contains(b) {
        Class::Zero
    } else {
        Class::Data
    }
}

/// Splits blocks `r` of an active cluster into runs of one class.
fn class_runs(a: Option<&ActiveCluster>, r: Range<u32>) -> Vec<(Class, Range<u32>)> {
    let at = |b| a.map_or(Class::Below, |a| class(a, b));
    let mut out: Vec<(Class, Range<u32>)> = Vec::new();
    for b in r {
        let k = at(b);
        match out.last_mut() {
            Some((lk, lr)) if *lk == k => lr.end = b + 1,
            _ => out.push((k, b..b + 1)),
        }
    }
    out
}

impl TopPath {
    pub(crate) fn new(node: Arc<Node>) -> Self {
        TopPath { node }
    }

    /// A write-class request, routed by stage.
    async fn change(&self, op: Op, offset: u64, content: Content, flags: WriteFlags) -> Result<()> {
        check_write(&self.info(), op, offset, content.len())?;
        let node = &self.node;
        let _gate = node.gate.read().await;
        match node.stage() {
            Stage::None => Err(Node::not_running(op, offset)),
            Stage::Running => node.write_active(offset, content).await,
            Stage::Failover | Stage::FailoverFailed => {
                node.write_routed(offset, content, flags).await
            }
            Stage::Done => node.write_disk(offset, content, flags).await,
        }
    }
}

#[async_trait]
impl BlockDev for TopPath {
    fn info(&self) -> DevInfo {
        let d = self.node.disk.info();
        DevInfo {
            len: d.len,
            min_block: 1,
            preferred_block: d.preferred_block.max(self.node.geo.block as u32),
            max_request: d.max_request,
            read_only: false,
            can_discard: true,
            fast_zero: true,
        }
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        check_range(Op::Read, offset, len as u64, self.node.geo.len)?;
        let node = &self.node;
        let _gate = node.gate.read().await;
        match node.stage() {
            Stage::None => Err(Node::not_running(Op::Read, offset)),
            Stage::Running => node.read_view(offset, len, true).await,
            Stage::Failover | Stage::FailoverFailed => node.read_view(offset, len, false).await,
            Stage::Done => node.disk.read(offset, len).await,
        }
    }

    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        self.change(Op::Write, offset, Content::Data(data), flags)
            .await
    }

    /// The overlays' flush is a no-op for internal stores: they are discarded at the next
    /// checkpoint and worthless after a crash. The disk is flushed once the VM may write it.
    async fn flush(&self) -> Result<()> {
        let node = &self.node;
        let _gate = node.gate.read().await;
        match node.stage() {
            Stage::None => Ok(()),
            Stage::Running => node.active.store.flush().await,
            Stage::Failover | Stage::FailoverFailed => {
                node.active.store.flush().await?;
                node.disk.flush().await
            }
            Stage::Done => node.disk.flush().await,
        }
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        let wf = WriteFlags { fua: flags.fua };
        self.change(Op::WriteZeroes, offset, Content::Zero(len, flags), wf)
            .await
    }

    /// Discarded ranges read as zeroes while they are in the active overlay.
    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.change(
            Op::Discard,
            offset,
            Content::Discard(len),
            WriteFlags::default(),
        )
        .await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<ExtentList> {
        check_status_range(offset, len, self.node.geo.len)?;
        let node = &self.node;
        let _gate = node.gate.read().await;
        match node.stage() {
            Stage::None => Err(Node::not_running(Op::BlockStatus, offset)),
            Stage::Done => node.disk.block_status(offset, len).await,
            _ => node.view_status(offset, len).await,
        }
    }
}

impl Node {
    /// Reads the view (active, hidden, disk).
    pub(crate) async fn read_view(&self, offset: u64, len: usize, cbw: bool) -> Result<Bytes> {
        let mut out = BytesMut::zeroed(len);
        self.read_view_into(offset, &mut out, cbw).await?;
        Ok(out.freeze())
    }

    async fn read_view_into(&self, offset: u64, out: &mut [u8], cbw: bool) -> Result<()> {
        let g = self.geo;
        let len = out.len() as u64;
        let mut pieces = Vec::new();
        let mut below = Vec::new();
        for c in g.clusters(offset, len) {
            let w = g.within(c, offset, len);
            let cs = g.start(c);
            let Some(a) = self.active.get(c) else {
                push_span(&mut below, cs + w.start..cs + w.end);
                continue;
            };
            for (k, r) in class_runs(Some(&a), g.blocks_touching(&w)) {
                let bytes = g.block_bytes(c, &r);
                let (lo, hi) = (bytes.start.max(w.start), bytes.end.min(w.end));
                let at = (cs + lo - offset) as usize;
                match k {
                    Class::Below => push_span(&mut below, cs + lo..cs + hi),
                    Class::Zero => out[at..at + (hi - lo) as usize].fill(0),
                    Class::Data => {
                        let slot = a.slot().ok_or_else(|| lost_slot(cs))?;
                        pieces.push(Piece {
                            pos: u64::from(slot) * g.cluster + lo,
                            at,
                            len: (hi - lo) as usize,
                        });
                    }
                }
            }
        }
        read_pieces(&*self.active.store, &coalesce(pieces), out).await?;
        self.read_below(&below, out, offset, cbw).await
    }

    /// Locks for a VM write: the clusters of partial edge blocks exclusive, the rest shared.
    fn write_locks(&self, offset: u64, len: u64) -> Vec<(u64, bool)> {
        let g = self.geo;
        let end = offset + len;
        let (a0, a1) = (g.block_floor(offset), g.block_ceil(end));
        let head = (offset != a0).then(|| g.cluster_of(a0));
        let tail = (end != a1).then(|| g.cluster_of(a1 - 1));
        g.clusters(offset, len)
            .map(|c| (c, Some(c) == head || Some(c) == tail))
            .collect()
    }

    /// A VM write in RUNNING: into the active overlay.
    pub(crate) async fn write_active(&self, offset: u64, content: Content) -> Result<()> {
        let len = content.len();
        if len == 0 {
            return Ok(());
        }
        let _guard = self.active.locks.lock(self.write_locks(offset, len)).await;
        self.write_active_locked(offset, content, true).await
    }

    /// Writes into the active overlay; the caller holds the clusters' active locks.
    async fn write_active_locked(&self, offset: u64, content: Content, cbw: bool) -> Result<()> {
        let g = self.geo;
        let end = offset + content.len();
        let (a0, a1) = (g.block_floor(offset), g.block_ceil(end));
        let head_partial = offset != a0;
        let tail_partial = end != a1;
        let mid0 = if head_partial {
            (a0 + g.block).min(a1)
        } else {
            a0
        };
        let mid1 = if tail_partial {
            g.block_floor(a1 - 1).max(mid0)
        } else {
            a1
        };
        if head_partial {
            let block = self.edge_block(a0..mid0, offset, &content, cbw).await?;
            self.store_data(a0, block).await?;
        }
        if mid0 < mid1 {
            match content.slice(mid0 - offset..mid1 - offset) {
                Content::Data(d) => self.store_data(mid0, d).await?,
                Content::Zero(..) | Content::Discard(_) => self.store_zero(mid0, mid1),
            }
        }
        if tail_partial && mid1 < a1 {
            let block = self.edge_block(mid1..a1, offset, &content, cbw).await?;
            self.store_data(mid1, block).await?;
        }
        Ok(())
    }

    /// The current view of `block` with the request's bytes laid over it.
    async fn edge_block(
        &self,
        block: Range<u64>,
        offset: u64,
        content: &Content,
        cbw: bool,
    ) -> Result<Bytes> {
        let mut buf = BytesMut::zeroed((block.end - block.start) as usize);
        self.read_view_into(block.start, &mut buf, cbw).await?;
        let lo = offset.max(block.start);
        let hi = (offset + content.len()).min(block.end);
        let dst = (lo - block.start) as usize..(hi - block.start) as usize;
        match content {
            Content::Data(d) => {
                buf[dst].copy_from_slice(&d[(lo - offset) as usize..(hi - offset) as usize]);
            }
            Content::Zero(..) | Content::Discard(_) => buf[dst].fill(0),
        }
        Ok(buf.freeze())
    }

    /// Stores whole blocks of data at `offset` (block-aligned; ends on a block or the disk end).
    async fn store_data(&self, offset: u64, data: Bytes) -> Result<()> {
        let g = self.geo;
        let len = data.len() as u64;
        let clusters: Vec<u64> = g.clusters(offset, len).collect();
        let slots = self.active.slots(&clusters)?;
        let mut pieces = Vec::with_capacity(clusters.len());
        for (&c, &slot) in clusters.iter().zip(&slots) {
            let w = g.within(c, offset, len);
            pieces.push(Piece {
                pos: u64::from(slot) * g.cluster + w.start,
                at: (g.start(c) + w.start - offset) as usize,
                len: (w.end - w.start) as usize,
            });
        }
        for p in coalesce(pieces) {
            self.active
                .store
                .write(p.pos, data.slice(p.at..p.at + p.len))
                .await?;
        }
        for &c in &clusters {
            let w = g.within(c, offset, len);
            self.active
                .record(c, Blocks::range(g.blocks_touching(&w)), Blocks::EMPTY);
        }
        Ok(())
    }

    /// Records whole blocks `offset..end` as zero.
    fn store_zero(&self, offset: u64, end: u64) {
        let g = self.geo;
        for c in g.clusters(offset, end - offset) {
            let w = g.within(c, offset, end - offset);
            self.active
                .record(c, Blocks::EMPTY, Blocks::range(g.blocks_touching(&w)));
        }
    }

    /// Whether cluster `c` is held by an overlay (QEMU: allocated above the base).
    pub(crate) fn held_by_overlay(&self, c: u64) -> bool {
        self.active.is_allocated(c) || self.hidden.contains(c)
    }

    /// A VM write during or after a failed failover.
    ///
    /// With a merge record: the clusters an overlay still holds are merged first, then the
    /// write goes to the disk. Nothing new goes into the overlays, so the record's frozen maps
    /// stay true, and a write to a cluster merged in this merge waits until the record says
    /// so (a resumed merge then never redoes that cluster over it).
    ///
    /// Without (overlays that die with the process): QEMU's FAILOVER_FAILED routing, clusters
    /// held by an overlay go to the active overlay, others straight to the disk (so a VM
    /// write there succeeds even while the disk fails).
    pub(crate) async fn write_routed(
        &self,
        offset: u64,
        content: Content,
        flags: WriteFlags,
    ) -> Result<()> {
        let len = content.len();
        if len == 0 {
            return Ok(());
        }
        let Some(journal) = self.journal() else {
            return self.write_routed_qemu(offset, content, flags).await;
        };
        let clusters = self.geo.clusters(offset, len);
        let held: Vec<u64> = clusters
            .clone()
            .filter(|&c| self.held_by_overlay(c))
            .collect();
        if !held.is_empty() {
            self.merge_now(&held).await?;
        }
        journal.wait_recorded(clusters).await?;
        self.write_disk(offset, content, flags).await
    }

    /// QEMU's routing (see [`write_routed`](Self::write_routed)).
    async fn write_routed_qemu(
        &self,
        offset: u64,
        content: Content,
        flags: WriteFlags,
    ) -> Result<()> {
        let g = self.geo;
        let len = content.len();
        let _guard = self.active.locks.lock(self.write_locks(offset, len)).await;
        let end = offset + len;
        let last = g.cluster_of(end - 1);
        let mut c = g.cluster_of(offset);
        while c <= last {
            let held = self.held_by_overlay(c);
            let mut d = c + 1;
            while d <= last && self.held_by_overlay(d) == held {
                d += 1;
            }
            let lo = offset.max(g.start(c));
            let hi = end.min(g.start(d - 1) + g.cluster_len(d - 1));
            let part = content.slice(lo - offset..hi - offset);
            if held {
                self.write_active_locked(lo, part, false).await?;
            } else {
                self.write_disk(lo, part, flags).await?;
            }
            c = d;
        }
        Ok(())
    }

    pub(crate) async fn write_disk(
        &self,
        offset: u64,
        content: Content,
        flags: WriteFlags,
    ) -> Result<()> {
        match content {
            Content::Data(d) => self.disk.write(offset, d, flags).await,
            Content::Zero(n, f) => self.disk.write_zeroes(offset, n, f).await,
            Content::Discard(n) => self.disk.discard(offset, n).await,
        }
    }

    /// Block status of the view.
    async fn view_status(&self, offset: u64, len: u64) -> Result<ExtentList> {
        let g = self.geo;
        let end = (offset + len).min(g.start(g.cluster_of(offset) + STATUS_CLUSTERS));
        let mut list = ExtentList::new();
        // Start of a stretch held by no overlay, answered by the disk in one call.
        let mut plain: Option<u64> = None;
        for c in g.clusters(offset, end - offset) {
            let cs = g.start(c);
            let w = g.within(c, offset, end - offset);
            let a = self.active.get(c).filter(|a| !a.alloc.is_empty());
            let h = self.hidden.get(c);
            if a.is_none() && h.is_none() {
                plain.get_or_insert(cs + w.start);
                continue;
            }
            let short = match plain.take() {
                Some(s) => !self.disk_status(&mut list, s, cs + w.start).await?,
                None => false,
            };
            if short {
                return Ok(list);
            }
            for (k, r) in class_runs(a.as_ref(), g.blocks_touching(&w)) {
                let bytes = g.block_bytes(c, &r);
                let (lo, hi) = (bytes.start.max(w.start), bytes.end.min(w.end));
                match (k, h) {
                    (Class::Data, _) | (Class::Below, Some(Preserved::Data(_))) => {
                        list.push(Extent::data(hi - lo))
                    }
                    (Class::Zero, _) | (Class::Below, Some(Preserved::Zero)) => {
                        list.push(Extent::zero(hi - lo))
                    }
                    (Class::Below, None) => {
                        if !self.disk_status(&mut list, cs + lo, cs + hi).await? {
                            return Ok(list);
                        }
                    }
                }
            }
        }
        if let Some(s) = plain {
            self.disk_status(&mut list, s, end).await?;
        }
        Ok(list)
    }

    /// Appends the disk's status of `s..e`; false if the disk described less (stop there).
    async fn disk_status(&self, list: &mut ExtentList, s: u64, e: u64) -> Result<bool> {
        let got = self.disk.block_status(s, e - s).await?;
        let mut n = 0;
        for ext in got.iter() {
            let l = ext.len.min(e - s - n);
            if l == 0 {
                break;
            }
            list.push(Extent { len: l, ..*ext });
            n += l;
        }
        Ok(n == e - s)
    }
}
