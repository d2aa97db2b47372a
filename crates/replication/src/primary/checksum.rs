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
use futures::StreamExt;

use super::dirty::DirtyBitmap;

/// A block's digest: BLAKE3, first 128 bits.
pub type Digest = [u8; 16];

/// Bytes compared per round trip to the secondary.
const WINDOW: u64 = 16 << 20;
/// Bytes read and hashed by one task; several run at once, on as many cores as there are.
const READ_CHUNK: u64 = 2 << 20;

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

/// Chunks hashed at once in this process, whoever asks: bounds the memory that comparisons
/// hold (a secondary answers several control connections) and leaves cores for the VM.
fn hashing_slots() -> &'static tokio::sync::Semaphore {
    static SLOTS: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    SLOTS.get_or_init(|| tokio::sync::Semaphore::new(2 * parallel_chunks()))
}

/// Chunks one call reads and hashes side by side: the cores, within reason.
fn parallel_chunks() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8))
}

fn digest(data: &[u8]) -> Digest {
    let mut d = [0u8; 16];
    d.copy_from_slice(&blake3::hash(data).as_bytes()[..16]);
    d
}

/// The digest of `len` zero bytes (what a hole reads as), without a buffer of that size.
fn zero_digest(len: u64) -> Digest {
    static ZEROES: [u8; 64 << 10] = [0; 64 << 10];
    let mut h = blake3::Hasher::new();
    let mut left = len;
    while left > 0 {
        let n = left.min(ZEROES.len() as u64);
        h.update(&ZEROES[..n as usize]);
        left -= n;
    }
    let mut d = [0u8; 16];
    d.copy_from_slice(&h.finalize().as_bytes()[..16]);
    d
}

/// Digests of `offset..offset+len` of `dev`, `block` bytes each (the last one shorter at the
/// range's end). Blocks the device reports as zero are not read: their digest is the digest
/// of zeroes, which is what hashing them would give, so both sides agree whatever their
/// allocation. The rest is read and hashed in chunks, several at once, off the async threads.
pub async fn digest_blocks(
    dev: &dyn BlockDev,
    offset: u64,
    len: u64,
    block: u64,
) -> Result<Vec<Digest>, BlockError> {
    let block = block.max(1);
    let chunk = (READ_CHUNK / block).max(1) * block;
    let zero_block = zero_digest(block);
    let end = offset + len;
    let chunks = (0..len.div_ceil(chunk)).map(|i| {
        let at = offset + i * chunk;
        (at, chunk.min(end - at))
    });
    let mut parts =
        futures::stream::iter(chunks.map(|(at, n)| digest_chunk(dev, at, n, block, zero_block)))
            .buffered(parallel_chunks());
    let mut out = Vec::with_capacity(len.div_ceil(block) as usize);
    while let Some(part) = parts.next().await {
        out.extend(part?);
    }
    Ok(out)
}

/// One chunk's digests: zero blocks from the block status, the others read and hashed.
async fn digest_chunk(
    dev: &dyn BlockDev,
    at: u64,
    n: u64,
    block: u64,
    zero_block: Digest,
) -> Result<Vec<Digest>, BlockError> {
    let _slot = hashing_slots()
        .acquire()
        .await
        .expect("the hashing semaphore is never closed");
    let blocks = n.div_ceil(block) as usize;
    // Which blocks lie wholly inside extents that read as zeroes.
    let mut zero = vec![false; blocks];
    let mut e_at = at;
    for e in dev.block_status(at, n).await?.iter() {
        let e_end = (e_at + e.len).min(at + n);
        if e.zero {
            let first = (e_at - at).div_ceil(block);
            for (i, z) in zero.iter_mut().enumerate().skip(first as usize) {
                let b_end = (at + (i as u64 + 1) * block).min(at + n);
                if b_end > e_end {
                    break;
                }
                *z = true;
            }
        }
        e_at = e_end;
        if e_at >= at + n {
            break;
        }
    }
    let Some(first) = zero.iter().position(|z| !z) else {
        return Ok((0..blocks)
            .map(|i| {
                let b = block.min(at + n - (at + i as u64 * block));
                if b == block {
                    zero_block
                } else {
                    zero_digest(b)
                }
            })
            .collect());
    };
    let last = zero.iter().rposition(|z| !z).expect("a block is not zero");
    // Only the span from the first to the last block that needs reading.
    let span_at = at + first as u64 * block;
    let span_end = (at + (last as u64 + 1) * block).min(at + n);
    let data = dev.read(span_at, (span_end - span_at) as usize).await?;
    let hashed = tokio::task::spawn_blocking(move || {
        data.chunks(block as usize).map(digest).collect::<Vec<_>>()
    })
    .await
    .map_err(|e| {
        BlockError::new(blockdev::ErrorKind::Io(None), blockdev::Op::Read, span_at)
            .context(format!("hashing: {e}"))
    })?;
    Ok((0..blocks)
        .map(|i| {
            if i >= first && i <= last {
                // A block inside the span is hashed, zero or not: same digest either way.
                hashed[i - first]
            } else {
                let b = block.min(at + n - (at + i as u64 * block));
                if b == block {
                    zero_block
                } else {
                    zero_digest(b)
                }
            }
        })
        .collect())
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
    // Two windows on their way: the next one's digests are computed on both sides while this
    // one's are compared, so neither side waits for a round trip between windows.
    let windows = (0..len.div_ceil(window)).map(|i| {
        let at = i * window;
        let n = (len - at).min(window);
        async move {
            let (mine, theirs) = tokio::join!(
                digest_blocks(local.as_ref(), at, n, block),
                remote.digests(at, n, block)
            );
            (at, n, mine, theirs)
        }
    });
    let mut windows = futures::stream::iter(windows).buffered(2);
    while let Some((at, n, mine, theirs)) = windows.next().await {
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
        report.compared_bytes += n;
        left.fetch_sub(n, Ordering::SeqCst);
        own.fetch_sub(n, Ordering::SeqCst);
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockdev::{ImageFormat, IoPool, OpenOptions};

    /// What the digests must be: BLAKE3 of each block's bytes, read plainly.
    fn plain(content: &[u8], offset: usize, len: usize, block: usize) -> Vec<Digest> {
        content[offset..offset + len]
            .chunks(block)
            .map(digest)
            .collect()
    }

    // Holes, allocated zeroes, a block half data and half hole, and a short last block: the
    // digests skip reading the zero blocks but must equal hashing every byte.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn digests_equal_hashing_every_byte_whatever_the_allocation() {
        const K: usize = 64 << 10;
        let len = 5 * (2 << 20) + 100;
        let mut content = vec![0u8; len];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.raw");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(len as u64).unwrap();
        use std::os::unix::fs::FileExt;
        let mut put = |at: usize, bytes: &[u8]| {
            f.write_all_at(bytes, at as u64).unwrap();
            content[at..at + bytes.len()].copy_from_slice(bytes);
        };
        put(K + 5, b"ten bytes!"); // a block mostly hole
        put(3 * K, &vec![0u8; K]); // allocated zeroes
        put(4 << 20, &testutil::pattern(7, 3 * K)); // data across a chunk's blocks
        put(len - 30, b"the short last block ends here"); // 100-byte last block
        drop(f);
        let pool = IoPool::new(2);
        let dev = blockdev::open(&path, OpenOptions::new(ImageFormat::Raw, pool)).unwrap();
        for (offset, l, block) in [
            (0, len, K),
            (K, len - K, K),
            (0, len, 4096),
            (2 << 20, 2 << 20, 3 * K),
            (len - 100, 100, K),
            (0, 2 * K, 1 << 20),
        ] {
            let got = digest_blocks(dev.as_ref(), offset as u64, l as u64, block as u64)
                .await
                .unwrap();
            assert_eq!(
                got,
                plain(&content, offset, l, block),
                "{offset}+{l}/{block}"
            );
        }
    }

    #[test]
    fn the_zero_digest_is_the_digest_of_zeroes() {
        for n in [0, 1, 4096, 64 << 10, (64 << 10) + 1, 1 << 20] {
            assert_eq!(zero_digest(n as u64), digest(&vec![0u8; n]), "{n}");
        }
    }
}
