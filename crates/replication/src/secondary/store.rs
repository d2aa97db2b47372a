//! The internal overlay stores: memory-only, or a sparse file in a buffer directory.
//!
//! Slots are handed out by bumping a counter; nothing is freed until the store is emptied at
//! the next checkpoint, because within an epoch a cluster is placed at most once per overlay.
//! Emptying is therefore "reset the counter and drop the bytes": `HashMap::clear` for memory,
//! `ftruncate(0)` for the file, both proportional to what was written, never to the disk size.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

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

impl MemoryStore {
    /// A store standing for a disk of `len` bytes.
    pub fn new(len: u64) -> Self {
        MemoryStore { len, slots: SlotCounter::default(), chunks: RwLock::new(HashMap::new()) }
    }

    /// Bytes of memory held for data.
    pub fn allocated_bytes(&self) -> u64 {
        self.chunks.read().len() as u64 * CHUNK
    }
}

#[async_trait]
impl Overlay for MemoryStore {
    fn len(&self) -> u64 {
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
        *self.chunks.write() = HashMap::new();
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
    file: Arc<File>,
    path: PathBuf,
    pool: IoPool,
}

impl FileStore {
    /// Creates an (unlinked) store file in `dir` for a disk of `len` bytes.
    pub fn create(dir: &Path, len: u64, pool: IoPool) -> Result<Self> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let name = format!(
            "coloblk-overlay-{}-{nanos}-{}.buf",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let path = dir.join(name);
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
        Ok(FileStore { len, slots: SlotCounter::default(), file: Arc::new(file), path, pool })
    }

    /// Where the store file was created (it is unlinked; for messages only).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes the store file currently spans (its apparent size).
    pub fn file_len(&self) -> u64 {
        self.file.metadata().map(|m| m.len()).unwrap_or(0)
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
    fn len(&self) -> u64 {
        self.len
    }

    fn can_make_empty(&self) -> bool {
        true
    }

    fn place(&self, _first: u64, count: u64) -> Result<u64> {
        self.slots.take(count)
    }

    async fn read(&self, pos: u64, len: usize) -> Result<Bytes> {
        let file = self.file.clone();
        self.pool
            .run(Op::Read, pos, move || {
                let mut buf = BytesMut::zeroed(len);
                read_full(&file, pos, &mut buf).map_err(|e| BlockError::from_io(e, Op::Read, pos))?;
                Ok(buf.freeze())
            })
            .await
    }

    async fn write(&self, pos: u64, data: Bytes) -> Result<()> {
        let file = self.file.clone();
        self.pool
            .run(Op::Write, pos, move || {
                file.write_all_at(&data, pos).map_err(|e| BlockError::from_io(e, Op::Write, pos))
            })
            .await
    }

    async fn make_empty(&self, _used: Option<&[Range<u64>]>) -> Result<()> {
        let file = self.file.clone();
        self.pool
            .run(Op::Discard, 0, move || {
                file.set_len(0).map_err(|e| BlockError::from_io(e, Op::Discard, 0))
            })
            .await?;
        self.slots.reset();
        Ok(())
    }

    /// Nothing to do: the overlay is thrown away at every checkpoint and useless after a crash
    /// of this host, so paying for fdatasync would buy nothing.
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
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "store file is unlinked");
        s.write(4096, Bytes::from_static(b"abc")).await.unwrap();
        assert_eq!(&s.read(4095, 6).await.unwrap()[..], b"\0abc\0\0");
        s.make_empty(None).await.unwrap();
        assert_eq!(s.file_len(), 0);
    }
}
