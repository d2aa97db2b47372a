//! Where the active and hidden overlays keep their bytes.
//!
//! The node itself tracks, in memory, which clusters (and which blocks of them) each overlay
//! holds; an [`Overlay`] only stores bytes at *slots* it hands out. That split is what lets a
//! checkpoint cost O(dirty clusters): forgetting the maps and telling the store to drop its
//! content is all there is, whatever the disk size. It also lets any kind of storage serve:
//!
//! - [`MemoryStore`](super::MemoryStore): bytes in memory (memory-only mode);
//! - [`FileStore`](super::FileStore): a sparse, unlinked file in a buffer directory (tmpfs
//!   recommended, like QEMU's advice to put active and hidden disks on a ramdisk);
//! - [`DevOverlay`]: a block device the user names, e.g. a qcow2 image, as in QEMU setups;
//!   slot = cluster number, so each cluster sits at its own offset, and emptying is a discard.
//!
//! A slot is `cluster_size` bytes at position `slot * cluster_size`; clusters placed together
//! get consecutive slots so that large copies stay large I/Os.

use std::ops::Range;
use std::sync::Arc;

use super::piece::fill_from;
use async_trait::async_trait;
use blockdev::{BlockDev, Result, WriteFlags};
use bytes::{Bytes, BytesMut};

/// Byte storage for one overlay (active or hidden).
///
/// Positions are `slot * cluster_size + offset_in_cluster`. The node reads only bytes it wrote
/// since the last [`make_empty`](Overlay::make_empty), so a store need not zero anything.
#[async_trait]
pub trait Overlay: Send + Sync + 'static {
    /// The disk length this overlay stands for; `start` refuses an overlay whose length differs
    /// from the secondary disk's (QEMU's length check).
    fn disk_len(&self) -> u64;

    /// Whether [`make_empty`](Overlay::make_empty) can reclaim the space (QEMU's
    /// `bdrv_make_empty` support check).
    fn can_make_empty(&self) -> bool;

    /// Reserves slots for clusters `first..first+count`; cluster `first + i` gets slot
    /// `returned + i`.
    fn place(&self, first: u64, count: u64) -> Result<u64>;

    /// Reads `len` bytes at position `pos`.
    async fn read(&self, pos: u64, len: usize) -> Result<Bytes>;

    /// Reads several ranges into one caller's buffer and hands it back: `reads` pairs a store
    /// position with the part of `buf` its bytes go to. The failover merge reads each batch
    /// this way into buffers it reuses; a store that can read in place overrides it, saving an
    /// allocation and a copy per range.
    async fn read_into(
        &self,
        reads: Vec<(u64, Range<usize>)>,
        mut buf: BytesMut,
    ) -> Result<BytesMut> {
        for (pos, to) in reads {
            let data = self.read(pos, to.len()).await?;
            fill_from(&mut buf, to.start, &data, to.len(), pos)?;
        }
        Ok(buf)
    }

    /// Writes `data` at position `pos`.
    async fn write(&self, pos: u64, data: Bytes) -> Result<()>;

    /// Drops all content and forgets all slots. `used` lists the position ranges written since
    /// the last emptying, when the node knows them (a hint that keeps the cost O(dirty) for
    /// stores that must discard piecewise); `None` means "anything may be there".
    async fn make_empty(&self, used: Option<&[Range<u64>]>) -> Result<()>;

    /// Makes written bytes durable, where that means anything.
    async fn flush(&self) -> Result<()>;

    /// Gives the store's content a name that outlives the process (`what` goes into it), so
    /// that a failover merge cut short by a crash can be resumed from it; `None` when the
    /// store cannot (its content dies with the process, or lives where the node cannot
    /// reopen it). Called with no I/O in flight.
    fn keep(&self, what: &str) -> Result<Option<std::path::PathBuf>> {
        let _ = what;
        Ok(None)
    }
}

/// An overlay kept in a block device named by the user (a qcow2 image, a raw file, ...).
///
/// Cluster `c` lives at its own disk offset (slot = cluster), so the device looks like the
/// overlay it stands for. Emptying discards the written ranges, so the device must support
/// discard ([`DevInfo::can_discard`](blockdev::DevInfo)) and be writable. Allocation is
/// tracked by the node, not read back from the device: a qcow2's backing file is not needed.
pub struct DevOverlay {
    dev: Arc<dyn BlockDev>,
}

/// Largest single discard sent when emptying a whole device.
const DISCARD_STEP: u64 = 1 << 30;

impl DevOverlay {
    /// An overlay kept in `dev`.
    pub fn new(dev: Arc<dyn BlockDev>) -> Self {
        DevOverlay { dev }
    }

    async fn discard_clipped(&self, r: &Range<u64>) -> Result<()> {
        let len = self.dev.len();
        let (mut pos, end) = (r.start.min(len), r.end.min(len));
        while pos < end {
            let n = (end - pos).min(DISCARD_STEP);
            self.dev.discard(pos, n).await?;
            pos += n;
        }
        Ok(())
    }
}

#[async_trait]
impl Overlay for DevOverlay {
    fn disk_len(&self) -> u64 {
        self.dev.len()
    }

    fn can_make_empty(&self) -> bool {
        let info = self.dev.info();
        info.can_discard && !info.read_only
    }

    fn place(&self, first: u64, _count: u64) -> Result<u64> {
        Ok(first)
    }

    async fn read(&self, pos: u64, len: usize) -> Result<Bytes> {
        self.dev.read(pos, len).await
    }

    async fn write(&self, pos: u64, data: Bytes) -> Result<()> {
        self.dev.write(pos, data, WriteFlags::default()).await
    }

    async fn make_empty(&self, used: Option<&[Range<u64>]>) -> Result<()> {
        match used {
            Some(ranges) => {
                let mut sorted = ranges.to_vec();
                sorted.sort_unstable_by_key(|r| r.start);
                let mut merged: Vec<Range<u64>> = Vec::with_capacity(sorted.len());
                for r in sorted {
                    match merged.last_mut() {
                        Some(l) if l.end >= r.start => l.end = l.end.max(r.end),
                        _ => merged.push(r),
                    }
                }
                for r in &merged {
                    self.discard_clipped(r).await?;
                }
                Ok(())
            }
            None => self.discard_clipped(&(0..self.dev.len())).await,
        }
    }

    async fn flush(&self) -> Result<()> {
        self.dev.flush().await
    }
}
