//! Raw image files: positional I/O on the [`IoPool`] (small reads the page cache holds and
//! buffered writes while they stay fast run on the caller's thread instead), fdatasync for
//! flush, fallocate for zeroes and discard, SEEK_DATA/SEEK_HOLE for block status, and optional
//! O_DIRECT.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use rustix::fs::{FallocateFlags, SeekFrom};
use rustix::io::{Errno, ReadWriteFlags};

use crate::pool::FastPath;
use crate::{
    BlockDev, BlockError, DevInfo, ErrorKind, Extent, ExtentList, IoPool, MAX_REQUEST, Op, Result,
    WriteFlags, ZeroFlags, check_range, check_status_range, check_write,
};

/// Alignment required by O_DIRECT on the file systems we care about.
const DIRECT_ALIGN: usize = 4096;

/// How to open a raw file.
#[derive(Debug, Clone, Default)]
pub struct RawOptions {
    /// Refuse writes; the file is opened read-only, so a read-only file can be served.
    pub read_only: bool,
    /// Bypass the page cache (O_DIRECT). Requests must then be 4 KiB aligned; the NBD server
    /// advertises that as its minimum block size.
    pub direct: bool,
}

/// A raw image file.
#[derive(Debug)]
pub struct RawFile {
    file: Arc<File>,
    path: PathBuf,
    info: DevInfo,
    direct: bool,
    pool: IoPool,
    /// Buffered writes run here while this file's writes stay fast.
    fast: Arc<FastPath>,
    /// The kernel and file system take `RWF_NOWAIT` reads (until one refuses).
    nowait_reads: AtomicBool,
}

impl RawFile {
    /// Opens an existing file; its current size is the device length.
    pub fn open(path: impl AsRef<Path>, opts: RawOptions, pool: IoPool) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let mut oo = OpenOptions::new();
        oo.read(true).write(!opts.read_only);
        if opts.direct {
            oo.custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32);
        }
        let open_err = |e| BlockError::from_io(e, Op::Open, 0).path(&path);
        let file = oo.open(&path).map_err(open_err)?;
        let len = file.metadata().map_err(open_err)?.len();
        let min_block = if opts.direct { DIRECT_ALIGN as u32 } else { 1 };
        Ok(RawFile {
            file: Arc::new(file),
            path,
            info: DevInfo {
                len,
                min_block,
                preferred_block: 4096,
                max_request: MAX_REQUEST,
                read_only: opts.read_only,
                can_discard: true,
                fast_zero: true,
            },
            direct: opts.direct,
            pool,
            fast: Arc::default(),
            nowait_reads: AtomicBool::new(true),
        })
    }

    /// Creates (or truncates) a sparse file of `len` bytes.
    pub fn create(path: impl AsRef<Path>, len: u64) -> Result<()> {
        let path = path.as_ref();
        let create_err = |e| BlockError::from_io(e, Op::Create, 0).path(path);
        let f = File::create(path).map_err(create_err)?;
        f.set_len(len).map_err(create_err)
    }

    /// The file this device reads and writes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Names this file in an error from one of its requests.
    fn named(&self, e: BlockError) -> BlockError {
        e.path(&self.path)
    }

    fn check_direct(&self, op: Op, offset: u64, len: u64) -> Result<()> {
        let a = DIRECT_ALIGN as u64;
        if self.direct && !(offset.is_multiple_of(a) && len.is_multiple_of(a)) {
            return Err(
                BlockError::new(ErrorKind::InvalidArgument, op, offset).context(format!(
                    "O_DIRECT needs {a}-byte aligned requests, got {len} bytes"
                )),
            );
        }
        Ok(())
    }
}

/// Largest read tried from the page cache on the caller's thread: beyond this the copy itself
/// is long enough to belong on a pool thread.
const INLINE_READ_MAX: usize = 256 * 1024;

/// Reads `len` bytes at `offset` if they are all in the page cache, without waiting for the
/// disk (`RWF_NOWAIT`); `None` when any part would wait, or the kernel or file system cannot
/// say, so that the caller reads on a pool thread instead. A kernel or file system that refuses
/// the flag altogether clears `supported`, so that later reads do not ask again.
fn read_cached(file: &File, supported: &AtomicBool, offset: u64, len: usize) -> Option<Bytes> {
    let mut buf = BytesMut::zeroed(len);
    let mut done = 0;
    while done < len {
        let mut slice = [std::io::IoSliceMut::new(&mut buf[done..])];
        match rustix::io::preadv2(
            file,
            &mut slice,
            offset + done as u64,
            ReadWriteFlags::NOWAIT,
        ) {
            Ok(0) => return None,
            Ok(n) => done += n,
            Err(Errno::OPNOTSUPP | Errno::NOSYS) => {
                supported.store(false, Ordering::Relaxed);
                return None;
            }
            Err(_) => return None,
        }
    }
    Some(buf.freeze())
}

/// Reads `len` bytes at `offset` into a new buffer that is not zeroed first: the read fills
/// it, and zeroing a large buffer cost as much CPU as the read itself.
fn read_new(file: &File, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(len);
    while buf.len() < len {
        let at = offset + buf.len() as u64;
        // Appends what it read to `buf` (its spare capacity, never beyond).
        match rustix::io::pread(file, rustix::buffer::spare_capacity(&mut buf), at) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => {}
            Err(Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    buf.truncate(len);
    Ok(buf)
}

/// Reads `len` bytes at `offset` into `buf`: what it held is overwritten, so only the part it
/// grows by is zeroed first (nothing, when a copy loop hands back buffers of one size).
fn read_fill(file: &File, offset: u64, len: usize, mut buf: Vec<u8>) -> std::io::Result<Vec<u8>> {
    if buf.is_empty() {
        return read_new(file, offset, len);
    }
    buf.truncate(len);
    buf.resize(len, 0);
    file.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

/// A buffer of `len` bytes whose start is aligned for O_DIRECT, carved out of a larger one.
fn aligned_buffer(len: usize) -> BytesMut {
    let mut buf = BytesMut::zeroed(len + DIRECT_ALIGN);
    let skip = buf.as_ptr().align_offset(DIRECT_ALIGN);
    let mut tail = buf.split_off(skip);
    tail.truncate(len);
    tail
}

fn fallocate(file: &File, flags: FallocateFlags, op: Op, offset: u64, len: u64) -> Result<()> {
    rustix::fs::fallocate(file, flags, offset, len).map_err(|e| errno_error(e, op, offset))
}

fn errno_error(e: Errno, op: Op, offset: u64) -> BlockError {
    BlockError::from_io(
        std::io::Error::from_raw_os_error(e.raw_os_error()),
        op,
        offset,
    )
}

/// Writes `len` zero bytes in bounded chunks (the fallback when fallocate cannot zero).
fn write_zero_bytes(file: &File, offset: u64, len: u64, direct: bool) -> Result<()> {
    const STEP: u64 = 1 << 20;
    let zeroes = if direct {
        aligned_buffer(STEP as usize)
    } else {
        BytesMut::zeroed(STEP as usize)
    };
    let mut done = 0;
    while done < len {
        let n = (len - done).min(STEP) as usize;
        file.write_all_at(&zeroes[..n], offset + done)
            .map_err(|e| BlockError::from_io(e, Op::WriteZeroes, offset + done))?;
        done += n as u64;
    }
    Ok(())
}

/// Walks SEEK_DATA/SEEK_HOLE over `offset..end`.
fn seek_extents(file: &File, offset: u64, end: u64) -> Result<ExtentList> {
    let mut list = ExtentList::new();
    let mut pos = offset;
    while pos < end {
        let data = match rustix::fs::seek(file, SeekFrom::Data(pos)) {
            Ok(d) => d.min(end),
            Err(Errno::NXIO) => end,
            Err(e) => return Err(errno_error(e, Op::BlockStatus, pos)),
        };
        if data > pos {
            list.push(Extent::hole(data - pos));
            pos = data;
            continue;
        }
        let hole = match rustix::fs::seek(file, SeekFrom::Hole(pos)) {
            Ok(h) => h.min(end),
            Err(Errno::NXIO) => end,
            Err(e) => return Err(errno_error(e, Op::BlockStatus, pos)),
        };
        // A hole offset at `pos` would contradict the data offset found above; treat the rest
        // as data rather than loop forever on a racing truncate.
        let hole = if hole <= pos { end } else { hole };
        list.push(Extent::data(hole - pos));
        pos = hole;
    }
    Ok(list)
}

#[async_trait]
impl BlockDev for RawFile {
    fn info(&self) -> DevInfo {
        self.info
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        check_range(Op::Read, offset, len as u64, self.info.len).map_err(|e| self.named(e))?;
        self.check_direct(Op::Read, offset, len as u64)
            .map_err(|e| self.named(e))?;
        if !self.direct && len <= INLINE_READ_MAX && self.nowait_reads.load(Ordering::Relaxed) {
            // Served from the page cache without blocking, or not at all (RWF_NOWAIT): a hit
            // costs one call here instead of two task switches through the pool.
            if let Some(buf) = read_cached(&self.file, &self.nowait_reads, offset, len) {
                return Ok(buf);
            }
        }
        let file = self.file.clone();
        let direct = self.direct;
        self.pool
            .run(Op::Read, offset, move || {
                if !direct {
                    return read_new(&file, offset, len)
                        .map(Bytes::from)
                        .map_err(|e| BlockError::from_io(e, Op::Read, offset));
                }
                let mut buf = aligned_buffer(len);
                file.read_exact_at(&mut buf, offset)
                    .map_err(|e| BlockError::from_io(e, Op::Read, offset))?;
                Ok(buf.freeze())
            })
            .await
            .map_err(|e| self.named(e))
    }

    async fn read_reusing(&self, offset: u64, len: usize, buf: Vec<u8>) -> Result<Vec<u8>> {
        if self.direct {
            return Ok(Vec::from(self.read(offset, len).await?));
        }
        check_range(Op::Read, offset, len as u64, self.info.len).map_err(|e| self.named(e))?;
        let file = self.file.clone();
        self.pool
            .run(Op::Read, offset, move || {
                read_fill(&file, offset, len, buf)
                    .map_err(|e| BlockError::from_io(e, Op::Read, offset))
            })
            .await
            .map_err(|e| self.named(e))
    }

    async fn write(&self, offset: u64, data: Bytes, flags: WriteFlags) -> Result<()> {
        check_write(&self.info, Op::Write, offset, data.len() as u64)
            .and_then(|()| self.check_direct(Op::Write, offset, data.len() as u64))
            .map_err(|e| self.named(e))?;
        let file = self.file.clone();
        let direct = self.direct;
        let write = move || {
            let aligned;
            let bytes: &[u8] = if direct && data.as_ptr().align_offset(DIRECT_ALIGN) != 0 {
                let mut b = aligned_buffer(data.len());
                b.copy_from_slice(&data);
                aligned = b;
                &aligned
            } else {
                &data
            };
            file.write_all_at(bytes, offset)
                .map_err(|e| BlockError::from_io(e, Op::Write, offset))?;
            if flags.fua {
                file.sync_data()
                    .map_err(|e| BlockError::from_io(e, Op::Write, offset))?;
            }
            Ok(())
        };
        // A buffered write that needs no sync normally only copies into the page cache: run it
        // here while such writes stay fast. Direct and FUA writes wait for the device.
        let done = if direct || flags.fua {
            self.pool.run(Op::Write, offset, write).await
        } else {
            self.fast.run(&self.pool, Op::Write, offset, write).await
        };
        done.map_err(|e| self.named(e))
    }

    async fn flush(&self) -> Result<()> {
        if self.info.read_only {
            return Ok(());
        }
        let file = self.file.clone();
        self.pool
            .run(Op::Flush, 0, move || {
                file.sync_data()
                    .map_err(|e| BlockError::from_io(e, Op::Flush, 0))
            })
            .await
            .map_err(|e| self.named(e))
    }

    async fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<()> {
        check_write(&self.info, Op::WriteZeroes, offset, len)
            .and_then(|()| self.check_direct(Op::WriteZeroes, offset, len))
            .map_err(|e| self.named(e))?;
        if len == 0 {
            return Ok(());
        }
        let file = self.file.clone();
        let direct = self.direct;
        self.pool
            .run(Op::WriteZeroes, offset, move || {
                let punch = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
                let zeroed = (flags.may_unmap
                    && fallocate(&file, punch, Op::WriteZeroes, offset, len).is_ok())
                    || fallocate(
                        &file,
                        FallocateFlags::ZERO_RANGE,
                        Op::WriteZeroes,
                        offset,
                        len,
                    )
                    .is_ok();
                if !zeroed {
                    if flags.fast_only {
                        return Err(BlockError::new(
                            ErrorKind::NotSupported,
                            Op::WriteZeroes,
                            offset,
                        )
                        .context("the file system cannot zero without writing"));
                    }
                    write_zero_bytes(&file, offset, len, direct)?;
                }
                if flags.fua {
                    file.sync_data()
                        .map_err(|e| BlockError::from_io(e, Op::WriteZeroes, offset))?;
                }
                Ok(())
            })
            .await
            .map_err(|e| self.named(e))
    }

    /// Punches a hole: the range reads as zeroes afterwards.
    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_write(&self.info, Op::Discard, offset, len).map_err(|e| self.named(e))?;
        if len == 0 {
            return Ok(());
        }
        let file = self.file.clone();
        self.pool
            .run(Op::Discard, offset, move || {
                let punch = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
                match fallocate(&file, punch, Op::Discard, offset, len) {
                    // A file system without hole punching: discard is advisory, so succeed.
                    Err(e) if e.kind == ErrorKind::NotSupported => Ok(()),
                    r => r,
                }
            })
            .await
            .map_err(|e| self.named(e))
    }

    async fn block_status(&self, offset: u64, len: u64) -> Result<ExtentList> {
        check_status_range(offset, len, self.info.len).map_err(|e| self.named(e))?;
        let file = self.file.clone();
        self.pool
            .run(Op::BlockStatus, offset, move || {
                seek_extents(&file, offset, offset + len)
            })
            .await
            .map_err(|e| self.named(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn fresh(len: u64) -> (tempfile::TempDir, RawFile) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("disk.raw");
        RawFile::create(&p, len).unwrap();
        let dev = RawFile::open(&p, RawOptions::default(), IoPool::default()).unwrap();
        (dir, dev)
    }

    #[tokio::test]
    async fn write_then_read_returns_the_bytes() {
        let (_d, dev) = fresh(1 << 20).await;
        dev.write(4095, Bytes::from_static(b"hello"), WriteFlags { fua: true })
            .await
            .unwrap();
        assert_eq!(&dev.read(4094, 7).await.unwrap()[..], b"\0hello\0");
    }

    // A recycled buffer holds an earlier read's bytes and may be longer or shorter than the
    // next read: none of its old content may show, and the last bytes of the file read whole.
    #[tokio::test]
    async fn reads_into_recycled_buffers_return_exactly_the_range() {
        let (_d, dev) = fresh(1 << 20).await;
        let data = testutil::pattern(3, 1 << 20);
        dev.write(0, data.clone(), WriteFlags::default())
            .await
            .unwrap();
        let stale = vec![0xee; 300 << 10];
        for (offset, len, buf) in [
            (0, 100 << 10, stale.clone()),           // shorter than the buffer
            (5, 500 << 10, stale.clone()),           // longer than the buffer
            ((1 << 20) - 4096, 4096, stale.clone()), // the file's last bytes
            (7, 1000, Vec::new()),                   // a fresh buffer
            (7, 1000, Vec::with_capacity(1 << 20)),  // empty, with room
        ] {
            let got = dev.read_reusing(offset as u64, len, buf).await.unwrap();
            assert_eq!(got, &data[offset..offset + len], "{offset}+{len}");
        }
        let past = dev.read_reusing((1 << 20) - 10, 20, stale).await;
        assert_eq!(past.unwrap_err().kind, ErrorKind::OutOfRange);
    }

    #[tokio::test]
    async fn cached_reads_return_the_bytes_and_decline_what_they_cannot_read() {
        let (_d, dev) = fresh(1 << 20).await;
        let data = testutil::pattern(7, 300 * 1024);
        dev.write(1000, data.clone(), WriteFlags::default())
            .await
            .unwrap();
        // Just written, so in the page cache: read here, exactly.
        let got = read_cached(&dev.file, &dev.nowait_reads, 1000, 4096).expect("a cached read");
        assert_eq!(got, data.slice(..4096));
        // Past the end of the file there is nothing to read: declined, not zeroes.
        assert!(read_cached(&dev.file, &dev.nowait_reads, 1 << 20, 4096).is_none());
        // Declining one read is not the file system refusing the flag: later reads still ask.
        assert!(dev.nowait_reads.load(Ordering::Relaxed));
        // Through the device: small reads go the cached way, big ones through the pool; both
        // return the same bytes.
        assert_eq!(dev.read(1000, 8192).await.unwrap(), data.slice(..8192));
        assert_eq!(dev.read(1000, data.len()).await.unwrap(), data);
    }

    #[tokio::test]
    async fn block_status_sees_data_and_holes() {
        let (_d, dev) = fresh(1 << 20).await;
        dev.write(65536, Bytes::from(vec![1u8; 65536]), WriteFlags::default())
            .await
            .unwrap();
        let st = dev.block_status(0, 1 << 20).await.unwrap();
        assert_eq!(
            st.0,
            vec![
                Extent::hole(65536),
                Extent::data(65536),
                Extent::hole((1 << 20) - 131072)
            ]
        );
    }

    #[tokio::test]
    async fn zeroes_and_discard_read_back_as_zero() {
        let (_d, dev) = fresh(1 << 20).await;
        dev.write(0, Bytes::from(vec![7u8; 1 << 20]), WriteFlags::default())
            .await
            .unwrap();
        dev.write_zeroes(100, 5000, ZeroFlags::default())
            .await
            .unwrap();
        dev.discard(65536, 65536).await.unwrap();
        let got = dev.read(0, 1 << 20).await.unwrap();
        assert!(got[..100].iter().all(|&b| b == 7));
        assert!(got[100..5100].iter().all(|&b| b == 0));
        assert!(got[5100..65536].iter().all(|&b| b == 7));
        assert!(got[65536..131072].iter().all(|&b| b == 0));
        assert!(got[131072..].iter().all(|&b| b == 7));
    }

    #[tokio::test]
    async fn direct_io_round_trips_and_refuses_unaligned() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.raw");
        RawFile::create(&p, 1 << 20).unwrap();
        let dev = match RawFile::open(
            &p,
            RawOptions {
                direct: true,
                ..Default::default()
            },
            IoPool::default(),
        ) {
            Ok(d) => d,
            // tmpfs refuses O_DIRECT; nothing to test there.
            Err(e) if e.kind == ErrorKind::Io(Some(22)) => return,
            Err(e) => panic!("{e}"),
        };
        dev.write(8192, Bytes::from(vec![9u8; 4096]), WriteFlags::default())
            .await
            .unwrap();
        assert_eq!(&dev.read(8192, 4096).await.unwrap()[..], &[9u8; 4096][..]);
        let e = dev.read(1, 4096).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
    }
}
