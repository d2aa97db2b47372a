//! What a block-layer call becomes on the wire: requests split at what the server takes, and
//! write-zeroes, trim and FUA emulated where it lacks them; and the [`BlockDev`] impl.

use std::future::Future;

use async_trait::async_trait;
use blockdev::{
    BatchWrite, BlockDev, DevInfo, ErrorKind, Extent, ExtentList, Op, Result, WriteFlags, ZeroFlags,
};
use bytes::{Bytes, BytesMut};
use futures::{StreamExt, stream};

use super::NbdClient;
use super::inflight::Cmd;
use crate::proto::*;

/// Largest trim, write-zeroes or block-status request: these carry no payload, so the maximum
/// block size does not bind them (as in qemu's client), but the length field is 32 bits.
const SPAN_LIMIT: u32 = 1 << 30;
/// Parts of one split request in flight at a time.
const SPLIT_PARALLELISM: usize = 8;
/// Size of the zero buffers written where the server cannot write zeroes itself.
const ZERO_CHUNK: u32 = 1 << 20;
static ZEROES: [u8; ZERO_CHUNK as usize] = [0; ZERO_CHUNK as usize];

impl NbdClient {
    /// Discards `offset..offset+len`; with `fua` the discard is durable on return. A no-op when
    /// the server does not advertise trim (discarded content is unspecified anyway).
    pub async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.check(Op::Discard, offset, len, true)?;
        if len == 0 || !self.info.can_trim() {
            return Ok(());
        }
        let wire_fua = fua && self.info.can_fua();
        let flags = if wire_fua { CMD_FLAG_FUA } else { 0 };
        self.for_each_span(offset, len, SPAN_LIMIT, |o, l| {
            self.command(Op::Discard, CMD_TRIM, flags, o, l)
        })
        .await?;
        self.emulate_fua(fua && !wire_fua).await
    }

    /// Asks the server to prefetch `offset..offset+len` (advisory: a no-op without server
    /// support).
    pub async fn cache(&self, offset: u64, len: u64) -> Result<()> {
        self.check(Op::Read, offset, len, false)?;
        if len == 0 || !self.info.can_cache() {
            return Ok(());
        }
        let limit = self.info.max_payload();
        self.for_each_span(offset, len, limit, |o, l| {
            self.command(Op::Read, CMD_CACHE, 0, o, l)
        })
        .await
    }

    /// Allocation status from `offset`: at least one byte and at most `len` bytes (at most
    /// 1 GiB per call) are described. With `req_one` the server describes just one extent.
    /// Without a `base:allocation` context everything reads as allocated data.
    pub async fn block_status_with(
        &self,
        offset: u64,
        len: u64,
        req_one: bool,
    ) -> Result<ExtentList> {
        self.check(Op::BlockStatus, offset, len, false)?;
        if len == 0 {
            return Ok(ExtentList::new());
        }
        let len = len.min(u64::from(SPAN_LIMIT)) as u32;
        if self.info.base_allocation.is_none() {
            return Ok(ExtentList(vec![Extent::data(u64::from(len))]));
        }
        let flags = if req_one { CMD_FLAG_REQ_ONE } else { 0 };
        let cmd = Cmd {
            op: Op::BlockStatus,
            kind: CMD_BLOCK_STATUS,
            flags,
            offset,
            len,
        };
        let mut extents = self.submit(cmd, None).await?.extents;
        if req_one {
            extents.0.truncate(1);
        }
        Ok(extents)
    }

    /// Runs `f` on each part of a range split at `limit`, a few parts at a time.
    pub(super) async fn for_each_span<'a, F, Fut>(
        &'a self,
        offset: u64,
        len: u64,
        limit: u32,
        f: F,
    ) -> Result<()>
    where
        F: FnMut(u64, u32) -> Fut,
        Fut: Future<Output = Result<()>> + 'a,
    {
        let mut f = f;
        // Every part runs to its end (reply or its own timeout) even when another failed: a
        // part dropped half-way would keep its slot with nobody left to time it out.
        let results: Vec<Result<()>> = stream::iter(spans(offset, len, limit))
            .map(|(o, l)| f(o, l))
            .buffer_unordered(SPLIT_PARALLELISM)
            .collect()
            .await;
        results.into_iter().collect()
    }

    /// Makes preceding writes durable where the server could not take FUA on the request.
    pub(super) async fn emulate_fua(&self, needed: bool) -> Result<()> {
        if needed {
            self.flush_writes().await
        } else {
            Ok(())
        }
    }

    pub(super) async fn flush_writes(&self) -> Result<()> {
        if !self.info.can_flush() {
            return Ok(());
        }
        self.command(Op::Flush, CMD_FLUSH, 0, 0, 0).await
    }

    pub(super) async fn read_range(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.check(Op::Read, offset, len as u64, false)?;
        let limit = self.info.max_payload();
        if len == 0 {
            return Ok(Bytes::new());
        }
        if len <= limit as usize {
            return self.read_one(offset, len as u32).await;
        }
        // As in for_each_span: wait for every part, then report the first failure.
        let parts: Vec<Result<Bytes>> = stream::iter(spans(offset, len as u64, limit))
            .map(|(o, l)| self.read_one(o, l))
            .buffered(SPLIT_PARALLELISM)
            .collect()
            .await;
        let parts = parts.into_iter().collect::<Result<Vec<Bytes>>>()?;
        let mut out = BytesMut::with_capacity(len);
        parts.iter().for_each(|p| out.extend_from_slice(p));
        Ok(out.freeze())
    }

    pub(super) async fn write_range(&self, offset: u64, data: Bytes, fua: bool) -> Result<()> {
        self.check(Op::Write, offset, data.len() as u64, true)?;
        let wire_fua = fua && self.info.can_fua();
        let flags = if wire_fua { CMD_FLAG_FUA } else { 0 };
        let data = &data;
        self.for_each_span(
            offset,
            data.len() as u64,
            self.info.max_payload(),
            |o, l| {
                let start = (o - offset) as usize;
                self.write_one(Op::Write, o, data.slice(start..start + l as usize), flags)
            },
        )
        .await?;
        self.emulate_fua(fua && !wire_fua).await
    }

    pub(super) async fn zero_range(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.check(Op::WriteZeroes, offset, len, true)?;
        if len == 0 {
            return Ok(());
        }
        if !self.info.can_write_zeroes() {
            return self.zero_by_writing(offset, len, flags).await;
        }
        if flags.fast_only && !self.info.can_fast_zero() {
            return Err(self.local_error(
                ErrorKind::NotSupported,
                Op::WriteZeroes,
                offset,
                "no fast zeroing",
            ));
        }
        let wire_fua = flags.fua && self.info.can_fua();
        let mut cmd_flags = 0;
        if wire_fua {
            cmd_flags |= CMD_FLAG_FUA;
        }
        if !flags.may_unmap {
            cmd_flags |= CMD_FLAG_NO_HOLE;
        }
        if flags.fast_only {
            cmd_flags |= CMD_FLAG_FAST_ZERO;
        }
        self.for_each_span(offset, len, SPAN_LIMIT, |o, l| {
            self.command(Op::WriteZeroes, CMD_WRITE_ZEROES, cmd_flags, o, l)
        })
        .await?;
        self.emulate_fua(flags.fua && !wire_fua).await
    }

    /// Write-zeroes for servers without NBD_CMD_WRITE_ZEROES: zero buffers on the wire.
    pub(super) async fn zero_by_writing(
        &self,
        offset: u64,
        len: u64,
        flags: ZeroFlags,
    ) -> Result<()> {
        if flags.fast_only {
            let why = "the server cannot write zeroes, and writing zero buffers is not fast";
            return Err(self.local_error(ErrorKind::NotSupported, Op::WriteZeroes, offset, why));
        }
        let wire_fua = flags.fua && self.info.can_fua();
        let cmd_flags = if wire_fua { CMD_FLAG_FUA } else { 0 };
        let chunk = self.info.max_payload().min(ZERO_CHUNK);
        self.for_each_span(offset, len, chunk, |o, l| {
            self.write_one(
                Op::WriteZeroes,
                o,
                Bytes::from_static(&ZEROES[..l as usize]),
                cmd_flags,
            )
        })
        .await?;
        self.emulate_fua(flags.fua && !wire_fua).await
    }
}

/// Splits `offset..offset+len` into parts of at most `limit` bytes.
fn spans(offset: u64, len: u64, limit: u32) -> impl Iterator<Item = (u64, u32)> {
    let limit = u64::from(limit.max(1));
    (0..len.div_ceil(limit)).map(move |i| {
        let start = i * limit;
        (offset + start, (len - start).min(limit) as u32)
    })
}

#[async_trait]
impl BlockDev for NbdClient {
    fn info(&self) -> DevInfo {
        self.info.dev_info()
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.read_range(offset, len).await
    }

    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        self.write_range(offset, data, flags.fua).await
    }

    async fn write_batch(&self, writes: Vec<BatchWrite>) -> Vec<Result<()>> {
        self.write_burst(writes).await
    }

    async fn flush(&self) -> Result<()> {
        self.flush_writes().await
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        self.zero_range(offset, len, flags).await
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.trim(offset, len, false).await
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<ExtentList> {
        self.block_status_with(offset, len, false).await
    }
}

#[cfg(test)]
mod tests {
    use super::super::scripted::*;
    use super::*;

    #[tokio::test]
    async fn large_reads_and_writes_are_split_at_the_maximum_block_size() {
        let (c, mut s) = pair_with_block_sizes().await;
        let c2 = c.clone();
        let data = Bytes::from((0..200_000u32).map(|i| i as u8).collect::<Vec<_>>());
        let expect = data.clone();
        let write = tokio::spawn(async move { c2.write(0, data, WriteFlags::default()).await });
        let mut got = vec![0; 200_000];
        for _ in 0..4 {
            let (r, payload) = read_request(&mut s).await;
            assert!(r.length <= 65536 && r.offset % 65536 == 0);
            got[r.offset as usize..][..payload.len()].copy_from_slice(&payload);
            send_simple(&mut s, 0, r.cookie).await;
        }
        write.await.unwrap().unwrap();
        assert_eq!(got, expect);
    }

    #[tokio::test]
    async fn write_zeroes_without_server_support_writes_zero_buffers() {
        let (c, mut s) = pair_with_flags(FLAG_HAS_FLAGS | FLAG_SEND_FLUSH).await;
        let c2 = c.clone();
        let zero =
            tokio::spawn(async move { c2.write_zeroes(8192, 3000, ZeroFlags::default()).await });
        let (r, payload) = read_request(&mut s).await;
        assert_eq!((r.kind, r.offset, payload.len()), (CMD_WRITE, 8192, 3000));
        assert!(payload.iter().all(|&b| b == 0));
        send_simple(&mut s, 0, r.cookie).await;
        zero.await.unwrap().unwrap();
        let fast = ZeroFlags {
            fast_only: true,
            ..ZeroFlags::default()
        };
        assert_eq!(
            c.write_zeroes(0, 512, fast).await.unwrap_err().kind,
            ErrorKind::NotSupported
        );
    }

    #[tokio::test]
    async fn write_zeroes_sends_no_hole_unless_unmap_is_allowed() {
        let (c, mut s) = pair(Offer::default(), config()).await;
        for (flags, want) in [
            (ZeroFlags::default(), CMD_FLAG_NO_HOLE),
            (
                ZeroFlags {
                    may_unmap: true,
                    ..ZeroFlags::default()
                },
                0,
            ),
            (
                ZeroFlags {
                    may_unmap: true,
                    fast_only: true,
                    fua: true,
                },
                CMD_FLAG_FAST_ZERO | CMD_FLAG_FUA,
            ),
        ] {
            let c2 = c.clone();
            let zero = tokio::spawn(async move { c2.write_zeroes(0, 4096, flags).await });
            let (r, _) = read_request(&mut s).await;
            assert_eq!((r.kind, r.flags), (CMD_WRITE_ZEROES, want));
            send_simple(&mut s, 0, r.cookie).await;
            zero.await.unwrap().unwrap();
        }
    }

    #[tokio::test]
    async fn trim_without_server_support_is_a_no_op() {
        let (c, mut s) = pair_with_flags(FLAG_HAS_FLAGS | FLAG_SEND_FLUSH).await;
        c.discard(0, 4096).await.unwrap();
        let c2 = c.clone();
        let flush = tokio::spawn(async move { c2.flush().await });
        let (r, _) = read_request(&mut s).await;
        assert_eq!(r.kind, CMD_FLUSH, "the trim must not reach the server");
        send_simple(&mut s, 0, r.cookie).await;
        flush.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn fua_without_server_support_becomes_a_flush() {
        let (c, mut s) = pair_with_flags(FLAG_HAS_FLAGS | FLAG_SEND_FLUSH).await;
        let c2 = c.clone();
        let write = tokio::spawn(async move {
            c2.write(0, Bytes::from_static(b"d"), WriteFlags { fua: true })
                .await
        });
        let (r, _) = read_request(&mut s).await;
        assert_eq!((r.kind, r.flags), (CMD_WRITE, 0));
        send_simple(&mut s, 0, r.cookie).await;
        let (r, _) = read_request(&mut s).await;
        assert_eq!(r.kind, CMD_FLUSH);
        send_simple(&mut s, 0, r.cookie).await;
        write.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn read_only_exports_refuse_writes_locally() {
        let (c, _s) = pair_with_flags(FLAG_HAS_FLAGS | FLAG_READ_ONLY).await;
        let err = c
            .write(0, Bytes::from_static(b"x"), WriteFlags::default())
            .await
            .unwrap_err();
        assert_eq!(err.kind, ErrorKind::ReadOnly);
        assert_eq!(
            c.read(1 << 20, 1).await.unwrap_err().kind,
            ErrorKind::OutOfRange
        );
    }

    #[test]
    fn spans_cover_the_range_in_order() {
        let v: Vec<_> = spans(10, 25, 10).collect();
        assert_eq!(v, vec![(10, 10), (20, 10), (30, 5)]);
        assert_eq!(spans(0, 0, 10).count(), 0);
    }
}
