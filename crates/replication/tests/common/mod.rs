//! Shared fixtures: fresh disks and nodes per test, exact range checks, and the
//! fault-injecting wrapper.

#![allow(dead_code)]

use std::sync::Arc;

use blockdev::{BlockDev, IoPool, MemoryDev, RawFile, RawOptions, WriteFlags};
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

/// The fault-injecting wrapper, as these tests use it: shared, with random delays (so that
/// concurrent requests complete out of order).
pub use testutil::FaultyDev as Faulty;

pub fn faulty(inner: Arc<dyn BlockDev>) -> Arc<Faulty> {
    let f = Faulty::new(inner);
    f.jitter.store(true, std::sync::atomic::Ordering::Relaxed);
    Arc::new(f)
}
