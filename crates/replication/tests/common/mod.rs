//! Shared fixtures: fresh disks and nodes per test, exact range checks, and a block device
//! wrapper that fails, splits or delays requests on demand.

#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use blockdev::{
    BlockDev, BlockError, DevInfo, ErrorKind, ExtentList, IoPool, MemoryDev, Op, RawFile,
    RawOptions, Result, WriteFlags, ZeroFlags,
};
use bytes::Bytes;
use replication::secondary::{OverlayStore, SecondaryConfig, SecondaryNode};

pub const MIB: u64 = 1 << 20;

/// Which kind of images a test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `MemoryDev` disk, memory-only overlays.
    Memory,
    /// `RawFile` disk in a temp dir, overlays in store files in that dir.
    Raw,
}

/// A fresh secondary disk and node; the temp dir lives as long as this.
pub struct Setup {
    pub node: SecondaryNode,
    pub disk: Arc<dyn BlockDev>,
    pub dir: tempfile::TempDir,
}

pub fn disk(backend: Backend, dir: &tempfile::TempDir, len: u64) -> Arc<dyn BlockDev> {
    match backend {
        Backend::Memory => Arc::new(MemoryDev::new(len)),
        Backend::Raw => {
            let p = dir.path().join("secondary.raw");
            RawFile::create(&p, len).unwrap();
            Arc::new(RawFile::open(&p, RawOptions::default(), IoPool::default()).unwrap())
        }
    }
}

pub fn config(backend: Backend, dir: &tempfile::TempDir, cluster_size: u64) -> SecondaryConfig {
    SecondaryConfig {
        cluster_size,
        store: match backend {
            Backend::Memory => OverlayStore::Memory,
            Backend::Raw => OverlayStore::BufferDir(dir.path().to_path_buf()),
        },
        pool: IoPool::default(),
    }
}

pub fn setup(backend: Backend, len: u64, cluster_size: u64) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let disk = disk(backend, &dir, len);
    let node = SecondaryNode::new(disk.clone(), config(backend, &dir, cluster_size)).unwrap();
    Setup { node, disk, dir }
}

/// A node over an arbitrary disk, memory overlays.
pub fn node_over(disk: Arc<dyn BlockDev>, cluster_size: u64) -> SecondaryNode {
    let config = SecondaryConfig {
        cluster_size,
        store: OverlayStore::Memory,
        ..Default::default()
    };
    SecondaryNode::new(disk, config).unwrap()
}

pub fn pattern(len: u64, byte: u8) -> Bytes {
    Bytes::from(vec![byte; len as usize])
}

/// Writes `len` bytes of `byte` at `offset`, in 4 MiB requests.
pub async fn fill(dev: &dyn BlockDev, offset: u64, len: u64, byte: u8) {
    let mut pos = offset;
    while pos < offset + len {
        let n = (offset + len - pos).min(4 * MIB);
        dev.write(pos, pattern(n, byte), WriteFlags::default())
            .await
            .unwrap();
        pos += n;
    }
}

/// Reads `offset..offset+len` in one request and compares every byte with `byte`.
pub async fn expect(dev: &dyn BlockDev, offset: u64, len: u64, byte: u8) {
    let got = dev.read(offset, len as usize).await.unwrap();
    if got[..] != vec![byte; len as usize][..] {
        let i = got.iter().position(|&b| b != byte).unwrap_or(0);
        panic!(
            "range {offset}..{}: byte {} is {:#04x}, expected {byte:#04x}",
            offset + len,
            offset + i as u64,
            got[i]
        );
    }
}

/// Reads the whole device.
pub async fn whole(dev: &dyn BlockDev) -> Vec<u8> {
    dev.read(0, dev.len() as usize).await.unwrap().to_vec()
}

/// A block device that fails, delays or splits requests when told to.
pub struct Faulty {
    inner: Arc<dyn BlockDev>,
    /// Write-class requests (write, zeroes, discard, flush) fail with EIO.
    pub fail_writes: AtomicBool,
    /// Reads fail with EIO.
    pub fail_reads: AtomicBool,
    /// When >= 0: that many more write-class requests succeed, then they fail.
    pub fail_writes_after: AtomicI64,
    /// Writes go down in two halves with a pause between (a torn write, if anyone looks).
    pub split_writes: AtomicBool,
    /// Every request sleeps up to this many microseconds (pseudo-random) first.
    pub delay_us: AtomicU64,
    /// Write-class requests wait while this is set.
    pub hold_writes: AtomicBool,
    /// Report `can_discard: false`.
    pub no_discard: AtomicBool,
    seed: AtomicU64,
}

impl Faulty {
    pub fn new(inner: Arc<dyn BlockDev>) -> Arc<Self> {
        Arc::new(Faulty {
            inner,
            fail_writes: AtomicBool::new(false),
            fail_reads: AtomicBool::new(false),
            fail_writes_after: AtomicI64::new(-1),
            split_writes: AtomicBool::new(false),
            hold_writes: AtomicBool::new(false),
            delay_us: AtomicU64::new(0),
            no_discard: AtomicBool::new(false),
            seed: AtomicU64::new(0x2545_F491_4F6C_DD1D),
        })
    }

    pub fn set(flag: &AtomicBool, on: bool) {
        flag.store(on, Ordering::SeqCst);
    }

    async fn delay(&self) {
        let us = self.delay_us.load(Ordering::Relaxed);
        if us > 0 {
            let x = self
                .seed
                .fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_micros((x >> 33) % (us + 1))).await;
        }
    }

    async fn before(&self, op: Op, offset: u64, write: bool) -> Result<()> {
        self.delay().await;
        let injected =
            || Err(BlockError::new(ErrorKind::Io(None), op, offset).context("injected fault"));
        if write {
            while self.hold_writes.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            if self.fail_writes.load(Ordering::SeqCst) {
                return injected();
            }
            let left = self.fail_writes_after.load(Ordering::SeqCst);
            if left == 0 {
                return injected();
            }
            if left > 0 {
                self.fail_writes_after.fetch_sub(1, Ordering::SeqCst);
            }
        } else if self.fail_reads.load(Ordering::SeqCst) {
            return injected();
        }
        Ok(())
    }
}

#[async_trait]
impl BlockDev for Faulty {
    fn info(&self) -> DevInfo {
        let mut i = self.inner.info();
        if self.no_discard.load(Ordering::SeqCst) {
            i.can_discard = false;
        }
        i
    }
    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.before(Op::Read, offset, false).await?;
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        self.before(Op::Write, offset, true).await?;
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
