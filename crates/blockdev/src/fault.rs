//! Fault injection for tests: a [`BlockDev`] wrapper that fails, delays or hangs on demand.
//!
//! Real peers do this too (nbdkit's error and delay filters); this wrapper does it in-process,
//! where a test needs to flip a fault on and off at an exact moment.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::{
    BlockDev, BlockError, DevInfo, ErrorKind, ExtentList, Op, Result, WriteFlags, ZeroFlags,
};

/// Wraps a device; every fault is off until switched on.
pub struct FaultyDev {
    inner: Arc<dyn BlockDev>,
    /// Write-class requests (write, zeroes, discard, flush) fail with EIO.
    pub fail_writes: AtomicBool,
    /// Reads fail with EIO.
    pub fail_reads: AtomicBool,
    /// Requests never complete while set.
    pub hang: AtomicBool,
    /// Every request sleeps this many microseconds first; with `jitter`, a pseudo-random
    /// part of it, so that concurrent requests complete out of order.
    pub delay_us: AtomicU64,
    pub jitter: AtomicBool,
    /// Write-class requests that reached the inner device.
    pub writes_seen: AtomicU64,
    seed: AtomicU64,
}

impl FaultyDev {
    pub fn new(inner: Arc<dyn BlockDev>) -> Self {
        FaultyDev {
            inner,
            fail_writes: AtomicBool::new(false),
            fail_reads: AtomicBool::new(false),
            hang: AtomicBool::new(false),
            delay_us: AtomicU64::new(0),
            jitter: AtomicBool::new(false),
            writes_seen: AtomicU64::new(0),
            seed: AtomicU64::new(0x2545_F491_4F6C_DD1D),
        }
    }

    async fn before(&self, op: Op, offset: u64, write: bool) -> Result<()> {
        let mut us = self.delay_us.load(Ordering::Relaxed);
        if us > 0 && self.jitter.load(Ordering::Relaxed) {
            let x = self
                .seed
                .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
            us = (x >> 33) % (us + 1);
        }
        if us > 0 {
            tokio::time::sleep(Duration::from_micros(us)).await;
        }
        while self.hang.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let fail = if write {
            &self.fail_writes
        } else {
            &self.fail_reads
        };
        if fail.load(Ordering::Relaxed) {
            return Err(BlockError::new(ErrorKind::Io(None), op, offset).context("injected fault"));
        }
        if write {
            self.writes_seen.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

#[async_trait]
impl BlockDev for FaultyDev {
    fn info(&self) -> DevInfo {
        self.inner.info()
    }
    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.before(Op::Read, offset, false).await?;
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        self.before(Op::Write, offset, true).await?;
        self.inner.write(offset, data, flags).await
    }
    async fn flush(&self) -> Result<()> {
        self.before(Op::Flush, 0, true).await?;
        self.inner.flush().await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.before(Op::WriteZeroes, offset, true).await?;
        self.inner.write_zeroes(offset, len, flags).await
    }
    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.before(Op::Discard, offset, true).await?;
        self.inner.discard(offset, len).await
    }
    async fn block_status(&self, offset: u64, len: u64) -> Result<ExtentList> {
        self.before(Op::BlockStatus, offset, false).await?;
        self.inner.block_status(offset, len).await
    }
}
