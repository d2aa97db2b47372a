//! The replica path: what the primary's forwarded requests do on the secondary.
//!
//! - RUNNING: every write, write-zeroes and discard first preserves the clusters it changes
//!   (copy-before-write), then goes to the secondary disk. If preserving fails, the request
//!   fails, the disk is untouched and the error becomes sticky (QEMU's
//!   `break-guest-write`, plus what QEMU forgets: telling the secondary's own state).
//! - NONE, and DONE after `stop(false)`: straight to the disk, as QEMU's NBD export does
//!   without its copy-before-write filter. Before start this is what a resync (drive-mirror
//!   to the export) needs.
//! - After `stop(true)` (FAILOVER, FAILOVER_FAILED, DONE): refused. The secondary is the
//!   authority now; a late write from the old primary would corrupt the merge or the new
//!   primary's disk (QEMU expects the operator to have stopped the NBD server first).
//!
//! Reads, flushes and block status go to the secondary disk.

use std::sync::Arc;

use async_trait::async_trait;
use blockdev::{
    BlockDev, BlockError, DevInfo, ErrorKind, ExtentList, Op, Result, WriteFlags, ZeroFlags,
    check_range, check_write,
};
use bytes::Bytes;

use super::{Node, Stage};

/// The secondary disk as the primary sees it. See the module docs.
#[derive(Clone)]
pub struct ReplicaPath {
    node: Arc<Node>,
}

/// A write-class request of the primary.
#[derive(Debug)]
enum Change {
    Write(Bytes, WriteFlags),
    Zero(u64, ZeroFlags),
    Discard(u64),
}

impl Change {
    fn op(&self) -> Op {
        match self {
            Change::Write(..) => Op::Write,
            Change::Zero(..) => Op::WriteZeroes,
            Change::Discard(_) => Op::Discard,
        }
    }

    fn len(&self) -> u64 {
        match self {
            Change::Write(d, _) => d.len() as u64,
            Change::Zero(n, _) | Change::Discard(n) => *n,
        }
    }

    async fn apply(self, disk: &dyn BlockDev, offset: u64) -> Result<()> {
        match self {
            Change::Write(d, f) => disk.write(offset, d, f).await,
            Change::Zero(n, f) => disk.write_zeroes(offset, n, f).await,
            Change::Discard(n) => disk.discard(offset, n).await,
        }
    }
}

/// What a replica request does, by stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Through,
    CopyBeforeWrite,
    Fenced,
}

impl ReplicaPath {
    pub(crate) fn new(node: Arc<Node>) -> Self {
        ReplicaPath { node }
    }

    fn route(&self) -> Route {
        let st = self.node.status.lock();
        if st.failed_over {
            Route::Fenced
        } else if st.stage == Stage::Running {
            Route::CopyBeforeWrite
        } else {
            Route::Through
        }
    }

    fn fenced(op: Op, offset: u64) -> BlockError {
        BlockError::new(ErrorKind::Shutdown, op, offset)
            .context("the secondary has failed over: the primary's requests are refused")
    }

    /// Runs a write-class request: copy-before-write when armed, then the disk.
    async fn change(&self, offset: u64, change: Change) -> Result<()> {
        let (op, len) = (change.op(), change.len());
        check_write(&self.info(), op, offset, len)?;
        let node = &self.node;
        let _gate = node.gate.read().await;
        match self.route() {
            Route::Fenced => Err(Self::fenced(op, offset)),
            Route::Through => change.apply(&*node.disk, offset).await,
            Route::CopyBeforeWrite => {
                let r = match node.copy_before_write(offset, len).await {
                    Ok(()) => change.apply(&*node.disk, offset).await,
                    Err(e) => Err(e),
                };
                // A primary write the disk did not get makes the next checkpoint unsafe.
                if let Err(e) = &r {
                    node.set_error(e);
                }
                r
            }
        }
    }
}

#[async_trait]
impl BlockDev for ReplicaPath {
    fn info(&self) -> DevInfo {
        self.node.disk.info()
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        check_range(Op::Read, offset, len as u64, self.node.geo.len)?;
        let _gate = self.node.gate.read().await;
        match self.route() {
            Route::Fenced => Err(Self::fenced(Op::Read, offset)),
            _ => self.node.disk.read(offset, len).await,
        }
    }

    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        self.change(offset, Change::Write(data, flags)).await
    }

    async fn flush(&self) -> Result<()> {
        let _gate = self.node.gate.read().await;
        match self.route() {
            Route::Fenced => Err(Self::fenced(Op::Flush, 0)),
            _ => self.node.disk.flush().await,
        }
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.change(offset, Change::Zero(len, flags)).await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.change(offset, Change::Discard(len)).await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<ExtentList> {
        let _gate = self.node.gate.read().await;
        match self.route() {
            Route::Fenced => Err(Self::fenced(Op::BlockStatus, offset)),
            _ => self.node.disk.block_status(offset, len).await,
        }
    }
}
