//! An in-memory, sparse block device for tests and for memory-only overlays.

use std::collections::BTreeMap;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use parking_lot::RwLock;

use crate::{
    BlockDev, DevInfo, Extent, ExtentList, MAX_REQUEST, Op, Result, WriteFlags, ZeroFlags,
    check_range, check_status_range, check_write,
};

/// Granularity of allocation in a [`MemoryDev`].
const CHUNK: u64 = 4096;

/// A sparse device held in memory: chunks never written read as zeroes and report as holes.
/// Discard and write-zeroes with `may_unmap` free whole chunks.
#[derive(Debug)]
pub struct MemoryDev {
    len: u64,
    read_only: bool,
    chunks: RwLock<BTreeMap<u64, Box<[u8]>>>,
}

impl MemoryDev {
    /// An empty (all-zero, unallocated) device of `len` bytes.
    pub fn new(len: u64) -> Self {
        MemoryDev {
            len,
            read_only: false,
            chunks: RwLock::new(BTreeMap::new()),
        }
    }

    /// A device whose whole content is `data`.
    pub fn with_data(data: &[u8]) -> Self {
        let dev = MemoryDev::new(data.len() as u64);
        dev.store(0, data);
        dev
    }

    /// The same device, refusing writes.
    pub fn read_only(mut self) -> Self {
        self.read_only = true;
        self
    }

    /// Bytes held in allocated chunks.
    pub fn allocated_bytes(&self) -> u64 {
        self.chunks.read().len() as u64 * CHUNK
    }

    /// Copies the whole content out (for test comparisons).
    pub fn snapshot(&self) -> Vec<u8> {
        let mut out = vec![0; self.len as usize];
        self.load(0, &mut out);
        out
    }

    fn load(&self, offset: u64, out: &mut [u8]) {
        let chunks = self.chunks.read();
        let mut pos = 0usize;
        while pos < out.len() {
            let abs = offset + pos as u64;
            let idx = abs / CHUNK;
            let within = (abs % CHUNK) as usize;
            let n = (CHUNK as usize - within).min(out.len() - pos);
            match chunks.get(&idx) {
                Some(c) => out[pos..pos + n].copy_from_slice(&c[within..within + n]),
                None => out[pos..pos + n].fill(0),
            }
            pos += n;
        }
    }

    fn store(&self, offset: u64, data: &[u8]) {
        let mut chunks = self.chunks.write();
        let mut pos = 0usize;
        while pos < data.len() {
            let abs = offset + pos as u64;
            let idx = abs / CHUNK;
            let within = (abs % CHUNK) as usize;
            let n = (CHUNK as usize - within).min(data.len() - pos);
            let c = chunks
                .entry(idx)
                .or_insert_with(|| vec![0u8; CHUNK as usize].into_boxed_slice());
            c[within..within + n].copy_from_slice(&data[pos..pos + n]);
            pos += n;
        }
    }

    /// Zeroes a range: whole chunks are freed, partial chunks are zero-filled when allocated.
    fn zero(&self, offset: u64, len: u64) {
        let mut chunks = self.chunks.write();
        let end = offset + len;
        let mut abs = offset;
        while abs < end {
            let idx = abs / CHUNK;
            let within = abs % CHUNK;
            let n = (CHUNK - within).min(end - abs);
            if within == 0 && (n == CHUNK || abs + n == self.len) {
                chunks.remove(&idx);
            } else if let Some(c) = chunks.get_mut(&idx) {
                c[within as usize..(within + n) as usize].fill(0);
            }
            abs += n;
        }
    }
}

#[async_trait]
impl BlockDev for MemoryDev {
    fn info(&self) -> DevInfo {
        DevInfo {
            len: self.len,
            min_block: 1,
            preferred_block: CHUNK as u32,
            max_request: MAX_REQUEST,
            read_only: self.read_only,
            can_discard: true,
            fast_zero: true,
        }
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        check_range(Op::Read, offset, len as u64, self.len)?;
        let mut buf = BytesMut::zeroed(len);
        self.load(offset, &mut buf);
        Ok(buf.freeze())
    }

    async fn write(&self, offset: u64, data: Bytes, _flags: WriteFlags) -> Result<()> {
        check_write(&self.info(), Op::Write, offset, data.len() as u64)?;
        self.store(offset, &data);
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, _flags: ZeroFlags) -> Result<()> {
        check_write(&self.info(), Op::WriteZeroes, offset, len)?;
        self.zero(offset, len);
        Ok(())
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_write(&self.info(), Op::Discard, offset, len)?;
        self.zero(offset, len);
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<ExtentList> {
        check_status_range(offset, len, self.len)?;
        let chunks = self.chunks.read();
        let mut list = ExtentList::new();
        let end = offset + len;
        let mut abs = offset;
        while abs < end {
            let idx = abs / CHUNK;
            let n = (CHUNK - abs % CHUNK).min(end - abs);
            list.push(if chunks.contains_key(&idx) {
                Extent::data(n)
            } else {
                Extent::hole(n)
            });
            abs += n;
        }
        Ok(list)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[tokio::test]
    async fn unwritten_reads_zero_and_reports_hole() {
        let dev = MemoryDev::new(3 * CHUNK + 100);
        assert_eq!(&dev.read(CHUNK - 2, 10).await.unwrap()[..], &[0u8; 10]);
        let st = dev.block_status(0, dev.len()).await.unwrap();
        assert_eq!(st.0, vec![Extent::hole(3 * CHUNK + 100)]);
    }

    #[tokio::test]
    async fn write_straddling_chunks_reads_back_and_allocates_both() {
        let dev = MemoryDev::new(4 * CHUNK);
        let data: Vec<u8> = (0..200u32).map(|i| i as u8).collect();
        dev.write(
            CHUNK - 100,
            Bytes::from(data.clone()),
            WriteFlags::default(),
        )
        .await
        .unwrap();
        assert_eq!(&dev.read(CHUNK - 100, 200).await.unwrap()[..], &data[..]);
        let st = dev.block_status(0, 4 * CHUNK).await.unwrap();
        assert_eq!(st.0, vec![Extent::data(2 * CHUNK), Extent::hole(2 * CHUNK)]);
    }

    #[tokio::test]
    async fn zeroes_free_whole_chunks_and_clear_partial_ones() {
        let dev = MemoryDev::with_data(&[0xAB; 3 * CHUNK as usize]);
        dev.write_zeroes(10, 2 * CHUNK, ZeroFlags::default())
            .await
            .unwrap();
        let got = dev.snapshot();
        assert!(got[..10].iter().all(|&b| b == 0xAB));
        assert!(got[10..(2 * CHUNK + 10) as usize].iter().all(|&b| b == 0));
        assert!(got[(2 * CHUNK + 10) as usize..].iter().all(|&b| b == 0xAB));
        assert_eq!(dev.allocated_bytes(), 2 * CHUNK);
    }

    #[tokio::test]
    async fn out_of_range_and_read_only_are_refused() {
        let dev = MemoryDev::new(CHUNK).read_only();
        let e = dev.read(CHUNK, 1).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::OutOfRange);
        let e = dev
            .write(0, Bytes::from_static(b"x"), WriteFlags::default())
            .await
            .unwrap_err();
        assert_eq!(e.kind, ErrorKind::ReadOnly);
        let e = dev.read(u64::MAX, 2).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::OutOfRange);
    }
}
