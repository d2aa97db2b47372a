//! Fault injection: a [`BlockDev`] wrapper that fails, delays, holds or tears
//! requests on demand.
//!
//! Real peers do this too (nbdkit's error and delay filters); this wrapper does it in-process,
//! where a test needs to flip a fault on and off at an exact moment. Every fault is an atomic
//! the test sets while requests run.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use blockdev::{
    BlockDev, BlockError, DevInfo, ErrorKind, ExtentList, Op, Result, WriteFlags, ZeroFlags,
};
use bytes::Bytes;

/// Wraps a device; every fault is off until switched on.
pub struct FaultyDev {
    inner: Arc<dyn BlockDev>,
    /// Write-class requests (write, zeroes, discard, flush) fail with EIO.
    pub fail_writes: AtomicBool,
    /// Reads fail with EIO.
    pub fail_reads: AtomicBool,
    /// When >= 0: that many more write-class requests succeed, then they fail.
    pub fail_writes_after: AtomicI64,
    /// Write-class requests whose range covers this byte fail with EIO (`u64::MAX`: off): one
    /// bad spot, for tests where the requests around it must succeed.
    pub fail_writes_at: AtomicU64,
    /// Requests never complete while set.
    pub hang: AtomicBool,
    /// Write-class requests wait while set (reads go on).
    pub hold_writes: AtomicBool,
    /// Writes go down in two halves with a pause between (a torn write, if anyone looks).
    pub split_writes: AtomicBool,
    /// Every request sleeps this many microseconds first; with `jitter`, a pseudo-random part
    /// of it, so that concurrent requests complete out of order.
    pub delay_us: AtomicU64,
    /// Makes `delay_us` a pseudo-random part of itself.
    pub jitter: AtomicBool,
    /// Report `can_discard: false`.
    pub no_discard: AtomicBool,
    /// Write-class requests that reached the inner device.
    pub writes_seen: AtomicU64,
    /// That many next flushes fail with EIO (the kernel reports a write-back error to one
    /// fdatasync only).
    pub fail_flushes: AtomicU64,
    seed: AtomicU64,
}

impl FaultyDev {
    /// Wraps `inner` with every fault off.
    pub fn new(inner: Arc<dyn BlockDev>) -> Self {
        FaultyDev {
            inner,
            fail_writes: AtomicBool::new(false),
            fail_reads: AtomicBool::new(false),
            fail_writes_after: AtomicI64::new(-1),
            fail_writes_at: AtomicU64::new(u64::MAX),
            hang: AtomicBool::new(false),
            hold_writes: AtomicBool::new(false),
            split_writes: AtomicBool::new(false),
            delay_us: AtomicU64::new(0),
            jitter: AtomicBool::new(false),
            no_discard: AtomicBool::new(false),
            writes_seen: AtomicU64::new(0),
            fail_flushes: AtomicU64::new(0),
            seed: AtomicU64::new(0x2545_F491_4F6C_DD1D),
        }
    }

    /// Switches a fault on or off (shorthand for a sequentially consistent store).
    pub fn set(flag: &AtomicBool, on: bool) {
        flag.store(on, Ordering::SeqCst);
    }

    async fn delay(&self) {
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
    }

    async fn before(&self, op: Op, offset: u64, len: u64, write: bool) -> Result<()> {
        self.delay().await;
        while self.hang.load(Ordering::SeqCst) || (write && self.hold_writes.load(Ordering::SeqCst))
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let injected =
            || Err(BlockError::new(ErrorKind::Io(None), op, offset).context("injected fault"));
        if write {
            let bad = self.fail_writes_at.load(Ordering::SeqCst);
            if self.fail_writes.load(Ordering::SeqCst)
                || (offset..offset.saturating_add(len)).contains(&bad)
            {
                return injected();
            }
            let left = self.fail_writes_after.load(Ordering::SeqCst);
            if left == 0 {
                return injected();
            }
            if left > 0 {
                self.fail_writes_after.fetch_sub(1, Ordering::SeqCst);
            }
            self.writes_seen.fetch_add(1, Ordering::Relaxed);
        } else if self.fail_reads.load(Ordering::SeqCst) {
            return injected();
        }
        Ok(())
    }
}

#[async_trait]
impl BlockDev for FaultyDev {
    fn info(&self) -> DevInfo {
        let mut info = self.inner.info();
        if self.no_discard.load(Ordering::SeqCst) {
            info.can_discard = false;
        }
        info
    }
    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.before(Op::Read, offset, len as u64, false).await?;
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        self.before(Op::Write, offset, data.len() as u64, true)
            .await?;
        if self.split_writes.load(Ordering::Relaxed) && data.len() > 1 {
            let half = data.len() / 2;
            self.inner.write(offset, data.slice(..half), flags).await?;
            self.delay().await;
            tokio::task::yield_now().await;
            return self
                .inner
                .write(offset + half as u64, data.slice(half..), flags)
                .await;
        }
        self.inner.write(offset, data, flags).await
    }
    async fn flush(&self) -> Result<()> {
        self.before(Op::Flush, 0, 0, true).await?;
        let once = self
            .fail_flushes
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if once.is_ok() {
            return Err(
                BlockError::new(ErrorKind::Io(None), Op::Flush, 0).context("injected fault")
            );
        }
        self.inner.flush().await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.before(Op::WriteZeroes, offset, len, true).await?;
        self.inner.write_zeroes(offset, len, flags).await
    }
    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.before(Op::Discard, offset, len, true).await?;
        self.inner.discard(offset, len).await
    }
    async fn block_status(&self, offset: u64, len: u64) -> Result<ExtentList> {
        self.before(Op::BlockStatus, offset, len, false).await?;
        self.inner.block_status(offset, len).await
    }
}
