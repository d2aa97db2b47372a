//! The block layer of coloblk.
//!
//! Everything that reads or writes an image goes through [`BlockDev`]: the NBD server serves a
//! `BlockDev`, the replication engine stacks overlays over `BlockDev`s, and the primary forwards
//! to a `BlockDev` that happens to be an NBD client. Offsets and lengths are bytes.
//!
//! ```text
//!            +---------------- BlockDev (async, byte offsets) ----------------+
//!            |                       |                      |                 |
//!        RawFile                  Qcow2                 MemoryDev         (nbd client,
//!   pread/pwrite, fallocate   imago (sync) on the       sparse chunks     replication
//!   on the I/O pool           I/O pool                  for tests          layers, ...)
//! ```
//!
//! [`open`] opens an image file by its [`ImageFormat`]; the drivers ([`RawFile`], [`Qcow2`],
//! [`MemoryDev`]) are public too, for callers that need a driver's own operations (creating
//! an image, emptying a qcow2 overlay).
//!
//! Disk I/O that may block runs on [`IoPool`], the drivers' own bounded thread pool. Only
//! calls that are cheap while the kernel keeps up run on the caller's tokio worker: reads the
//! page cache holds (asked with `RWF_NOWAIT`, so they never wait for the disk) and buffered
//! writes while a device's writes stay fast, one at a time.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod error;
mod extent;
mod image;
mod memory;
mod pool;
mod qcow2;
mod raw;

use async_trait::async_trait;
use bytes::Bytes;

pub use error::{BlockError, ErrorKind, Op, Result};
pub use extent::{Extent, ExtentList};
pub use image::{ImageFormat, OpenOptions, open};
pub use memory::MemoryDev;
pub use pool::IoPool;
pub use qcow2::{DEFAULT_CLUSTER_SIZE, Qcow2, Qcow2Backing, Qcow2CreateOptions, Qcow2Options};
pub use raw::{RawFile, RawOptions};

/// Flags of a write. `fua` asks that the data be durable before the write completes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteFlags {
    /// Durable before completion (NBD's FUA flag).
    pub fua: bool,
}

/// Flags of a write-zeroes request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// Durable before completion.
    pub fua: bool,
    /// The range may be deallocated (punched) instead of written with zeroes.
    pub may_unmap: bool,
    /// Fail with [`ErrorKind::NotSupported`] unless zeroing is fast (no data written).
    pub fast_only: bool,
}

/// One write of a batch ([`BlockDev::write_batch`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchWrite {
    /// Where the data goes, in bytes.
    pub offset: u64,
    /// The bytes to write.
    pub data: Bytes,
    /// As for [`BlockDev::write`].
    pub flags: WriteFlags,
}

/// Static facts about a device, fixed once it is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DevInfo {
    /// Length in bytes.
    pub len: u64,
    /// Smallest request alignment the device handles without read-modify-write.
    pub min_block: u32,
    /// Preferred request alignment.
    pub preferred_block: u32,
    /// Largest single request.
    pub max_request: u32,
    /// Writes are refused.
    pub read_only: bool,
    /// Discard does something (otherwise it is accepted and ignored).
    pub can_discard: bool,
    /// Write-zeroes is cheaper than writing a buffer of zeroes.
    pub fast_zero: bool,
}

/// Largest request the block layer passes down in one call (the NBD limit too).
pub const MAX_REQUEST: u32 = 32 * 1024 * 1024;

/// A block device with byte offsets.
///
/// Implementations are shared between tasks (`Arc<dyn BlockDev>`) and must accept concurrent
/// requests. Requests outside `0..len` fail with [`ErrorKind::OutOfRange`]; writes to a read-only
/// device fail with [`ErrorKind::ReadOnly`].
#[async_trait]
pub trait BlockDev: Send + Sync + 'static {
    /// Static facts (length, alignment, capabilities).
    fn info(&self) -> DevInfo;

    /// Length in bytes.
    fn len(&self) -> u64 {
        self.info().len
    }

    /// A zero-length device (legal, if useless).
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads `len` bytes at `offset`.
    async fn read(&self, offset: u64, len: usize) -> Result<Bytes>;

    /// Reads `len` bytes at `offset` into `buf`, whose allocation is reused where the driver
    /// can (a copy loop that recycles its buffers saves the kernel's page faults and zeroing
    /// of a fresh allocation per read); the default reads as [`BlockDev::read`] does.
    async fn read_reusing(&self, offset: u64, len: usize, buf: Vec<u8>) -> Result<Vec<u8>> {
        drop(buf);
        Ok(Vec::from(self.read(offset, len).await?))
    }

    /// Writes `data` at `offset`.
    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()>;

    /// Writes every entry of `writes`, which must not overlap one another, in no particular
    /// order; returns one result per entry, in the order given.
    ///
    /// The primary forwards a burst of the VM's writes this way. A device on a pipelined link
    /// (the NBD client) sends the burst as one run of frames and is woken once for all the
    /// replies, where one call per write costs a send, a timer and a wake-up each; this default
    /// runs the writes concurrently.
    async fn write_batch(&self, writes: Vec<BatchWrite>) -> Vec<Result<()>> {
        futures::future::join_all(
            writes
                .into_iter()
                .map(|w| self.write(w.offset, w.data, w.flags)),
        )
        .await
    }

    /// Makes every completed write durable.
    async fn flush(&self) -> Result<()>;

    /// Makes `offset..offset+len` read as zeroes.
    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()>;

    /// Tells the device the range is no longer needed. Its content afterwards is unspecified
    /// by contract (drivers document what they do).
    async fn discard(&self, offset: u64, len: u64) -> Result<()>;

    /// Describes allocation of `offset..offset+len` (the extents cover at least one byte and at
    /// most `len` bytes, in order, starting at `offset`).
    async fn block_status(&self, offset: u64, len: u64) -> Result<ExtentList>;
}

/// Checks that `offset..offset+len` lies within a device of length `dev_len`.
pub fn check_range(op: Op, offset: u64, len: u64, dev_len: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= dev_len => Ok(()),
        _ => Err(
            BlockError::new(ErrorKind::OutOfRange, op, offset).context(format!(
                "length {len} past the end of a {dev_len}-byte device"
            )),
        ),
    }
}

/// Checks a block-status request: in range, and not empty (the protocol has no answer for
/// zero bytes).
pub fn check_status_range(offset: u64, len: u64, dev_len: u64) -> Result<()> {
    check_range(Op::BlockStatus, offset, len, dev_len)?;
    if len == 0 {
        return Err(BlockError::new(
            ErrorKind::InvalidArgument,
            Op::BlockStatus,
            offset,
        ));
    }
    Ok(())
}

/// Checks a write-class request: in range and device writable.
pub fn check_write(info: &DevInfo, op: Op, offset: u64, len: u64) -> Result<()> {
    if info.read_only {
        return Err(BlockError::new(ErrorKind::ReadOnly, op, offset));
    }
    check_range(op, offset, len, info.len)
}
