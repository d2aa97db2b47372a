//! The internal overlay stores: memory-only, or a sparse file in a buffer directory.
//!
//! Slots are handed out by bumping a counter; nothing is freed until the store is emptied at
//! the next checkpoint, because within an epoch a cluster is placed at most once per overlay.
//! Emptying is therefore "reset the counter and drop the bytes", and even the dropping is
//! taken off the checkpoint's critical path (both VMs are paused during a checkpoint): the
//! memory store swaps in a fresh map, the file store swaps in a fresh unlinked file, and the old
//! map or file is released on a blocking thread (closing the last descriptor of an unlinked
//! file frees its pages). A checkpoint costs O(1) here; releasing costs O(written bytes),
//! never O(disk size), and happens in the background. A store nothing was written to since
//! the last emptying does nothing at all.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use async_trait::async_trait;
use blockdev::{BlockError, ErrorKind, IoPool, Op, Result};
use bytes::{Bytes, BytesMut};
use parking_lot::RwLock;

use super::overlay::Overlay;

/// Bytes per memory chunk: small enough that a 4 KiB VM write costs 4 KiB of memory, not a
/// whole cluster.
const CHUNK: u64 = 4096;

/// Hands out consecutive slots, refusing to run past what the maps can index.
#[derive(Debug, Default)]
struct SlotCounter(AtomicU64);

impl SlotCounter {
    fn take(&self, count: u64) -> Result<u64> {
        let first = self.0.fetch_add(count, Ordering::Relaxed);
        if first.saturating_add(count) >= u64::from(u32::MAX) {
            return Err(BlockError::new(ErrorKind::NoSpace, Op::Write, first)
                .context("overlay store out of slots"));
        }
        Ok(first)
    }

    fn reset(&self) {
        self.0.store(0, Ordering::Relaxed);
    }
}

/// An overlay held in memory, in sparse 4 KiB chunks.
#[derive(Debug)]
pub struct MemoryStore {
    len: u64,
    slots: SlotCounter,
    chunks: RwLock<HashMap<u64, Box<[u8]>>>,
}

/// Releases `old` on a blocking thread when there is a runtime to run it, else here.
fn release_later<T: Send + 'static>(old: T) {
    match tokio::runtime::Handle::try_current() {
        Ok(h) => {
            h.spawn_blocking(move || drop(old));
        }
        Err(_) => drop(old),
    }
}

impl MemoryStore {
    /// A store standing for a disk of `len` bytes.
    pub fn new(len: u64) -> Self {
        MemoryStore {
            len,
            slots: SlotCounter::default(),
            chunks: RwLock::new(HashMap::new()),
        }
    }

    /// Bytes of memory held for data.
    pub fn allocated_bytes(&self) -> u64 {
        self.chunks.read().len() as u64 * CHUNK
    }
}

#[async_trait]
impl Overlay for MemoryStore {
    fn disk_len(&self) -> u64 {
        self.len
    }

    fn can_make_empty(&self) -> bool {
        true
    }

    fn place(&self, _first: u64, count: u64) -> Result<u64> {
        self.slots.take(count)
    }

    async fn read(&self, pos: u64, len: usize) -> Result<Bytes> {
        let mut out = BytesMut::zeroed(len);
        let chunks = self.chunks.read();
        let mut done = 0usize;
        while done < len {
            let abs = pos + done as u64;
            let within = (abs % CHUNK) as usize;
            let n = (CHUNK as usize - within).min(len - done);
            if let Some(c) = chunks.get(&(abs / CHUNK)) {
                out[done..done + n].copy_from_slice(&c[within..within + n]);
            }
            done += n;
        }
        Ok(out.freeze())
    }

    async fn write(&self, pos: u64, data: Bytes) -> Result<()> {
        let mut chunks = self.chunks.write();
        let mut done = 0usize;
        while done < data.len() {
            let abs = pos + done as u64;
            let within = (abs % CHUNK) as usize;
            let n = (CHUNK as usize - within).min(data.len() - done);
            let c = chunks
                .entry(abs / CHUNK)
                .or_insert_with(|| vec![0u8; CHUNK as usize].into_boxed_slice());
            c[within..within + n].copy_from_slice(&data[done..done + n]);
            done += n;
        }
        Ok(())
    }

    async fn make_empty(&self, _used: Option<&[Range<u64>]>) -> Result<()> {
        // A fresh map rather than clear(): clear keeps the capacity, and the point of a
        // checkpoint is to give the memory back.
        let old = std::mem::take(&mut *self.chunks.write());
        if !old.is_empty() {
            release_later(old);
        }
        self.slots.reset();
        Ok(())
    }

    async fn flush(&self) -> Result<()> {
        Ok(())
    }
}

/// An overlay held in a sparse file in a buffer directory.
///
/// The file is unlinked as soon as it is open, so nothing is left behind if the process dies;
/// its content is worthless after a crash anyway (the speculative VM dies with it).
#[derive(Debug)]
pub struct FileStore {
    len: u64,
    slots: SlotCounter,
    /// The current file; replaced by a fresh one when the store is emptied.
    file: RwLock<Arc<File>>,
    /// Something was written since the last emptying.
    written: AtomicBool,
    dir: PathBuf,
    pool: IoPool,
}

/// A fresh name for a store file in `dir` (unique per process, time and call).
fn store_name(dir: &Path, what: &str) -> PathBuf {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    dir.join(format!(
        "coloblk-{what}-{}-{nanos}-{}.buf",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Creates an unlinked file in `dir`: an `O_TMPFILE` one where the file system has them (it
/// can be given a name later, see [`FileStore::keep`]), else a named one unlinked at once.
fn unlinked_file(dir: &Path) -> Result<File> {
    use rustix::fs::{Mode, OFlags};
    let flags = OFlags::RDWR | OFlags::TMPFILE | OFlags::CLOEXEC;
    if let Ok(fd) = rustix::fs::open(dir, flags, Mode::RUSR | Mode::WUSR) {
        return Ok(File::from(fd));
    }
    let path = store_name(dir, "overlay");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| {
            BlockError::from_io(e, Op::Create, 0)
                .context(format!("cannot create overlay store {}", path.display()))
        })?;
    std::fs::remove_file(&path).map_err(|e| {
        BlockError::from_io(e, Op::Create, 0)
            .context(format!("cannot unlink overlay store {}", path.display()))
    })?;
    Ok(file)
}

impl FileStore {
    /// Creates an (unlinked) store file in `dir` for a disk of `len` bytes.
    pub fn create(dir: &Path, len: u64, pool: IoPool) -> Result<Self> {
        let file = unlinked_file(dir)?;
        Ok(FileStore {
            len,
            slots: SlotCounter::default(),
            file: RwLock::new(Arc::new(file)),
            written: AtomicBool::new(false),
            dir: dir.to_path_buf(),
            pool,
        })
    }

    /// Reopens a store file that [`keep`](Overlay::keep) named, for a merge resumed after the
    /// process died. The file keeps its name until the caller removes it.
    pub fn open_kept(path: &Path, len: u64, pool: IoPool) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| {
                BlockError::from_io(e, Op::Open, 0)
                    .context(format!("cannot open kept overlay store {}", path.display()))
            })?;
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        Ok(FileStore {
            len,
            slots: SlotCounter::default(),
            file: RwLock::new(Arc::new(file)),
            written: AtomicBool::new(true),
            dir,
            pool,
        })
    }

    /// The buffer directory the store files are created in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes the current store file spans (its apparent size).
    pub fn file_len(&self) -> u64 {
        self.file.read().metadata().map(|m| m.len()).unwrap_or(0)
    }

    fn current(&self) -> Arc<File> {
        self.file.read().clone()
    }
}

/// Reads what is there; bytes past the end of the file read as zero.
fn read_full(file: &File, pos: u64, buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], pos + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf[done..].fill(0);
    Ok(())
}

#[async_trait]
impl Overlay for FileStore {
    fn disk_len(&self) -> u64 {
        self.len
    }

    fn can_make_empty(&self) -> bool {
        true
    }

    fn place(&self, _first: u64, count: u64) -> Result<u64> {
        self.slots.take(count)
    }

    async fn read(&self, pos: u64, len: usize) -> Result<Bytes> {
        let file = self.current();
        self.pool
            .run(Op::Read, pos, move || {
                let mut buf = BytesMut::zeroed(len);
                read_full(&file, pos, &mut buf)
                    .map_err(|e| BlockError::from_io(e, Op::Read, pos))?;
                Ok(buf.freeze())
            })
            .await
    }

    /// All ranges in one pool call, straight into `buf`: the merge's batches cost no
    /// allocation, zeroing or copy here.
    async fn read_into(&self, reads: Vec<(u64, Range<usize>)>, buf: BytesMut) -> Result<BytesMut> {
        let file = self.current();
        let first = reads.first().map_or(0, |r| r.0);
        self.pool
            .run(Op::Read, first, move || {
                let mut buf = buf;
                for (pos, to) in reads {
                    let Some(part) = buf.get_mut(to.clone()) else {
                        return Err(BlockError::new(ErrorKind::InvalidArgument, Op::Read, pos)
                            .context(format!("read into {to:?} of a {} byte buffer", buf.len())));
                    };
                    read_full(&file, pos, part)
                        .map_err(|e| BlockError::from_io(e, Op::Read, pos))?;
                }
                Ok(buf)
            })
            .await
    }

    async fn write(&self, pos: u64, data: Bytes) -> Result<()> {
        self.written.store(true, Ordering::Relaxed);
        let file = self.current();
        self.pool
            .run(Op::Write, pos, move || {
                file.write_all_at(&data, pos)
                    .map_err(|e| BlockError::from_io(e, Op::Write, pos))
            })
            .await
    }

    async fn make_empty(&self, _used: Option<&[Range<u64>]>) -> Result<()> {
        if self.written.swap(false, Ordering::Relaxed) {
            let dir = self.dir.clone();
            let fresh = self
                .pool
                .run(Op::Discard, 0, move || unlinked_file(&dir))
                .await;
            let fresh = fresh.inspect_err(|_| self.written.store(true, Ordering::Relaxed))?;
            let old = std::mem::replace(&mut *self.file.write(), Arc::new(fresh));
            release_later(old);
        }
        self.slots.reset();
        Ok(())
    }

    /// Names the current (`O_TMPFILE`) file in the buffer directory: one `linkat` through
    /// `/proc/self/fd`, no copy and no flush. A file made the old way (named, then unlinked)
    /// cannot be named again: that is an error, and the merge then cannot be resumed.
    fn keep(&self, what: &str) -> Result<Option<PathBuf>> {
        use std::os::fd::AsRawFd;
        let file = self.current();
        let path = store_name(&self.dir, what);
        let fd = format!("/proc/self/fd/{}", file.as_raw_fd());
        rustix::fs::linkat(
            rustix::fs::CWD,
            fd.as_str(),
            rustix::fs::CWD,
            &path,
            rustix::fs::AtFlags::SYMLINK_FOLLOW,
        )
        .map_err(|e| {
            BlockError::from_io(e.into(), Op::Create, 0)
                .context(format!("cannot name the overlay store {}", path.display()))
        })?;
        Ok(Some(path))
    }

    /// Nothing to do: the overlay is thrown away at every checkpoint and useless after a crash
    /// of this host, so paying for fdatasync would buy nothing (a failover merge resumed
    /// after a crash of the process finds its bytes in the page cache).
    async fn flush(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn memory_store_round_trips_across_chunks_and_empties() {
        let s = MemoryStore::new(1 << 20);
        let slot = s.place(3, 2).unwrap();
        assert_eq!(slot, 0);
        let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        s.write(100, Bytes::from(data.clone())).await.unwrap();
        assert_eq!(&s.read(100, data.len()).await.unwrap()[..], &data[..]);
        s.make_empty(None).await.unwrap();
        assert_eq!(s.allocated_bytes(), 0);
        assert_eq!(s.place(0, 1).unwrap(), 0);
    }

    #[tokio::test]
    async fn file_store_round_trips_reads_zero_past_eof_and_truncates() {
        let dir = tempfile::tempdir().unwrap();
        let s = FileStore::create(dir.path(), 1 << 20, IoPool::default()).unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "store file is unlinked"
        );
        s.write(4096, Bytes::from_static(b"abc")).await.unwrap();
        assert_eq!(&s.read(4095, 6).await.unwrap()[..], b"\0abc\0\0");
        s.make_empty(None).await.unwrap();
        assert_eq!(s.file_len(), 0);
        assert_eq!(s.read(4096, 3).await.unwrap()[..], [0, 0, 0]);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
