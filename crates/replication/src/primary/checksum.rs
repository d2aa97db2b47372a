//! Checksum sync: compares the two disks block by block through digests, so a secondary that
//! is already (nearly) equal costs two reads and a few digests on the link, not a copy.
//!
//! ```text
//!   local disk --read, BLAKE3--> digests --+
//!                                          +--compare--> differing blocks marked dirty --> resync
//!   secondary  --its digests (remote)-----+
//! ```
//!
//! Digests are BLAKE3 cut to 128 bits, over whole blocks (the last one up to the disk's end).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use blockdev::{BlockDev, BlockError};

use super::dirty::DirtyBitmap;

/// A block's digest: BLAKE3, first 128 bits.
pub type Digest = [u8; 16];

/// Bytes compared per round trip to the secondary.
const WINDOW: u64 = 16 << 20;
/// Bytes read and hashed at a time (a daemon's memory stays small while it compares).
const READ_CHUNK: u64 = 1 << 20;

/// Where the secondary's digests come from (its control socket, in the daemon).
#[async_trait]
pub trait RemoteDigests: Send + Sync {
    /// Digests of `offset..offset+len` of the secondary disk, `block` bytes each.
    async fn digests(&self, offset: u64, len: u64, block: u64) -> Result<Vec<Digest>, String>;
}

/// What a checksum sync found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChecksumReport {
    /// Bytes compared.
    pub compared_bytes: u64,
    /// Bytes found different (marked dirty).
    pub differing_bytes: u64,
}

/// Digests of `offset..offset+len` of `dev`, `block` bytes each (the last one shorter at the
/// range's end).
pub async fn digest_blocks(
    dev: &dyn BlockDev,
    offset: u64,
    len: u64,
    block: u64,
) -> Result<Vec<Digest>, BlockError> {
    let mut out = Vec::with_capacity(len.div_ceil(block.max(1)) as usize);
    let end = offset + len;
    let mut at = offset;
    // Reads of a chunk (or a block, if larger) at a time, hashed a block at a time.
    while at < end {
        let n = (end - at).min(READ_CHUNK.max(block));
        let data = dev.read(at, n as usize).await?;
        for chunk in data.chunks(block as usize) {
            let hash = blake3::hash(chunk);
            let mut d = [0u8; 16];
            d.copy_from_slice(&hash.as_bytes()[..16]);
            out.push(d);
        }
        at += n;
    }
    Ok(out)
}

/// The comparison proper: window by window, the local digests computed while the remote ones
/// are on their way; each window compared is taken off `left` (which the caller raised by the
/// disk's length: several comparisons may run at once, each counts down its own share).
pub(super) async fn compare(
    local: &Arc<dyn BlockDev>,
    remote: &dyn RemoteDigests,
    dirty: &DirtyBitmap,
    block: u64,
    left: &AtomicU64,
    own: &AtomicU64,
) -> Result<ChecksumReport, String> {
    let len = local.len();
    let block = block
        .max(dirty.granularity())
        .next_multiple_of(dirty.granularity());
    let window = WINDOW.next_multiple_of(block);
    let mut report = ChecksumReport::default();
    let mut at = 0;
    while at < len {
        let n = (len - at).min(window);
        let (mine, theirs) = tokio::join!(
            digest_blocks(local.as_ref(), at, n, block),
            remote.digests(at, n, block)
        );
        let mine = mine.map_err(|e| format!("reading the local disk: {e}"))?;
        let theirs = theirs?;
        if theirs.len() != mine.len() {
            return Err(format!(
                "the secondary sent {} digests for {} blocks at offset {at}",
                theirs.len(),
                mine.len()
            ));
        }
        for (i, (a, b)) in mine.iter().zip(&theirs).enumerate() {
            if a != b {
                let o = at + i as u64 * block;
                let l = block.min(at + n - o);
                dirty.mark(o, l);
                report.differing_bytes += l;
            }
        }
        at += n;
        report.compared_bytes += n;
        left.fetch_sub(n, Ordering::SeqCst);
        own.fetch_sub(n, Ordering::SeqCst);
    }
    Ok(report)
}
